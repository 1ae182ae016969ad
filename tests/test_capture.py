"""The capture trigger: legacy JSONB writes land in the event log and, by diff, in rows."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.capture_support import (
    TENANT,
    Conn,
    count,
    events_of,
    go,
    images_of,
    img,
    in_sync,
    new_product,
    rows_of,
    urls_of,
    write_images,
)

A, B, C, D = (f"https://cdn.example/{x}.jpg" for x in "abcd")


@pytest.fixture
def dual(conn: Conn) -> Conn:
    """A migrated database with user_1 in stage dual_write."""
    go(conn, "dual_write")
    return conn


def test_insert_projects_rows_and_logs_event(dual: Conn) -> None:
    """A new product's images become rows, and an images.inserted event is logged."""
    pid = new_product(dual, [img(A, 0), img(B, 1)])
    assert urls_of(dual, pid) == [A, B]
    ((kind, payload, source),) = events_of(dual, pid)
    assert (kind, source) == ("images.inserted", "legacy")
    assert payload["after"] == [img(A, 0), img(B, 1)]
    assert payload["before"] is None


def test_update_diff_keeps_ids_and_table_only_metadata(dual: Conn) -> None:
    """Reorder, add and remove touch only what changed; kept rows keep id and alt_text."""
    pid = new_product(dual, [img(A, 0), img(B, 1), img(C, 2)])
    before = {r[1]: r[0] for r in rows_of(dual, pid)}
    dual.execute(
        f"UPDATE {TENANT}.product_images SET alt_text = 'kept', is_label = true "
        "WHERE product_id = %s AND url = %s",
        (pid, C),
    )
    write_images(dual, pid, [img(C, 0), img(A, 1), img(D, 2)])
    rows = rows_of(dual, pid)
    assert [(r[1], r[2]) for r in rows] == [(C, 0), (A, 1), (D, 2)]
    assert rows[0][0] == before[C]
    assert rows[0][3:5] == (True, "kept")
    assert rows[1][0] == before[A]
    assert D not in before
    assert events_of(dual, pid)[-1][1]["before"] == [img(A, 0), img(B, 1), img(C, 2)]


def test_explicit_label_moves_the_label(dual: Conn) -> None:
    """An element stating is_label decides the product's label; the old one is cleared."""
    pid = new_product(dual, [img(A, 0, is_label=True), img(B, 1)])
    write_images(dual, pid, [img(A, 0), img(B, 1, is_label=True)])
    assert [r[3] for r in rows_of(dual, pid)] == [False, True]
    assert in_sync(dual, pid)


def test_non_image_write_logs_nothing(dual: Conn) -> None:
    """Updating another column appends no event and touches no row."""
    pid = new_product(dual, [img(A, 0)])
    n = count(dual, TENANT, "image_events")
    dual.execute(f"UPDATE {TENANT}.products SET title = 'new title' WHERE id = %s", (pid,))
    dual.execute(f"UPDATE {TENANT}.products SET images = images WHERE id = %s", (pid,))
    assert count(dual, TENANT, "image_events") == n


def test_delete_logs_event_and_rows_cascade(dual: Conn) -> None:
    """Deleting a product logs images.deleted with the old array; its rows go."""
    pid = new_product(dual, [img(A, 0)])
    dual.execute(f"DELETE FROM {TENANT}.products WHERE id = %s", (pid,))
    kind, payload, _ = events_of(dual, pid)[-1]
    assert (kind, payload["before"], payload["after"]) == ("images.deleted", [img(A, 0)], None)
    assert rows_of(dual, pid) == []


def test_multi_row_update_of_thousands_in_one_statement(dual: Conn) -> None:
    """One UPDATE of 3,000 products is captured and projected in one set-based pass."""
    dual.execute(
        f"INSERT INTO {TENANT}.products (sku, title, images) "
        "SELECT 'bulk-' || g, 'bulk', jsonb_build_array(jsonb_build_object("
        "'url', 'https://bulk/' || g || '.jpg', 'order', 0)) FROM generate_series(1, 3000) g"
    )
    dual.execute(
        f"UPDATE {TENANT}.products SET images = images || jsonb_build_array(jsonb_build_object("
        "'url', 'https://bulk/extra-' || id || '.jpg', 'order', 1)) WHERE sku LIKE 'bulk-%%'"
    )
    row = dual.execute(
        f"SELECT count(*), count(*) FILTER (WHERE imgmig.images_hash(p.images) = "
        f"imgmig.rows_hash('{TENANT}', p.id)) FROM {TENANT}.products p WHERE sku LIKE 'bulk-%%'"
    ).fetchone()
    assert row == (3000, 3000)
    assert dual.execute(
        f"SELECT count(*) FROM {TENANT}.image_events WHERE type = 'images.updated'"
    ).fetchone() == (3000,)


def test_rolled_back_write_leaves_no_event_and_no_row(dual: Conn) -> None:
    """A legacy write in a rolled-back transaction leaves neither an event nor a row."""
    pid = new_product(dual, [img(A, 0)])
    events, rows = count(dual, TENANT, "image_events"), count(dual, TENANT, "product_images")
    with dual.transaction(force_rollback=True):
        write_images(dual, pid, [img(A, 0), img(B, 1)])
        new_product(dual, [img(C, 0)], sku="rolled-back")
    assert count(dual, TENANT, "image_events") == events
    assert count(dual, TENANT, "product_images") == rows


def test_event_log_is_append_only(dual: Conn) -> None:
    """UPDATE, DELETE and TRUNCATE on the event log are refused."""
    new_product(dual, [img(A, 0)])
    for stmt in ("UPDATE {}.image_events SET type = 'x'", "DELETE FROM {}.image_events"):
        with pytest.raises(errors.InsufficientPrivilege):
            dual.execute(stmt.format(TENANT))
    with pytest.raises(errors.InsufficientPrivilege):
        dual.execute(f"TRUNCATE {TENANT}.image_events")


def test_event_source_comes_from_the_transaction_setting(dual: Conn) -> None:
    """imgmig.source (transaction-local) names the writer; the default is legacy."""
    pid = new_product(dual, [img(A, 0)])
    with dual.transaction():
        dual.execute("SELECT set_config('imgmig.source', 'backfill', true)")
        write_images(dual, pid, [img(B, 0)])
    write_images(dual, pid, [img(C, 0)])
    assert [e[2] for e in events_of(dual, pid)] == ["legacy", "backfill", "legacy"]


def test_outbox_columns_are_filled(dual: Conn) -> None:
    """Each event carries the Debezium outbox columns plus tenant, source, txid and time."""
    pid = new_product(dual, [img(A, 0)])
    row = dual.execute(
        f"SELECT id IS NOT NULL, aggregatetype, aggregateid, tenant, txid > 0, at IS NOT NULL "
        f"FROM {TENANT}.image_events WHERE aggregateid = %s::text",
        (pid,),
    ).fetchone()
    assert row == (True, "product", str(pid), TENANT, True, True)


def _hammer(url: str, pid: int, worker: int, rounds: int, errors_seen: list[BaseException]) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as c:
            for n in range(rounds):
                with c.transaction():
                    cur: Any = c.execute(
                        f"SELECT images FROM {TENANT}.products WHERE id = %s FOR UPDATE", (pid,)
                    ).fetchone()
                    images = [*cur[0], img(f"https://w{worker}/{n}.jpg", len(cur[0]))]
                    write_images(c, pid, images)
    except BaseException as exc:  # surfaced by the test thread
        errors_seen.append(exc)


def _run_threads(url: str, pids: list[int], rounds: int) -> None:
    seen: list[BaseException] = []
    threads = [
        threading.Thread(target=_hammer, args=(url, pid, w, rounds, seen))
        for w, pid in enumerate(pids)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == []


def test_concurrent_writers_on_one_product(dual: Conn, migrated_url: str) -> None:
    """Four connections appending to the same product end with both sides equal."""
    pid = new_product(dual, [img(A, 0)])
    _run_threads(migrated_url, [pid] * 4, rounds=10)
    assert len(images_of(dual, pid)) == 41
    assert len(rows_of(dual, pid)) == 41
    assert in_sync(dual, pid)
    assert len([e for e in events_of(dual, pid) if e[0] == "images.updated"]) == 40


def test_concurrent_writers_on_different_products(dual: Conn, migrated_url: str) -> None:
    """Four connections each writing their own product all end in sync."""
    pids = [new_product(dual, [img(A, 0)], sku=f"c{n}") for n in range(4)]
    _run_threads(migrated_url, pids, rounds=15)
    for pid in pids:
        assert len(rows_of(dual, pid)) == 16
        assert in_sync(dual, pid)
