"""Reverse sync (stage table): writes to product_images rewrite products.images."""

from __future__ import annotations

import threading

import psycopg
import pytest

from cdc import capture, cutover, project
from cdc import stage as stage_mod
from cdc.errors import StageRefusedError
from cdc.stage import Stage
from tests.capture_support import (
    TENANT,
    Conn,
    events_of,
    go,
    images_of,
    img,
    in_sync,
    new_product,
    rows_of,
    write_images,
)

A, B, C = (f"https://cdn.example/{x}.jpg" for x in "abc")


@pytest.fixture
def table_stage(conn: Conn) -> Conn:
    """A migrated database with user_1 moved through dual_write to stage table."""
    go(conn, "dual_write")
    go(conn, "table")
    return conn


def test_row_insert_update_delete_rewrite_the_jsonb(table_stage: Conn) -> None:
    """Insert, update and delete on the table each show up in products.images."""
    c = table_stage
    pid = new_product(c, [img(A, 0)])
    c.execute(
        f'INSERT INTO {TENANT}.product_images (product_id, url, "order", is_label, created_at) '
        "VALUES (%s, %s, 1, true, '2025-03-01 12:00:00+00')",
        (pid, B),
    )
    assert images_of(c, pid) == [img(A, 0), img(B, 1, is_label=True)]
    c.execute(
        f"UPDATE {TENANT}.product_images SET alt_text = 'front' WHERE product_id = %s AND url = %s",
        (pid, A),
    )
    assert images_of(c, pid)[0] == img(A, 0, alt_text="front")
    c.execute(f"DELETE FROM {TENANT}.product_images WHERE product_id = %s AND url = %s", (pid, A))
    assert images_of(c, pid) == [img(B, 1, is_label=True)]
    assert in_sync(c, pid)


def test_reverse_writes_are_logged_as_service_without_ping_pong(table_stage: Conn) -> None:
    """Each table write logs exactly one 'service' event and is not projected back."""
    c = table_stage
    pid = new_product(c, [img(A, 0)])
    ids = [r[0] for r in rows_of(c, pid)]
    c.execute(f"UPDATE {TENANT}.product_images SET alt_text = 'x' WHERE product_id = %s", (pid,))
    assert [r[0] for r in rows_of(c, pid)] == ids
    assert [(e[0], e[2]) for e in events_of(c, pid)] == [
        ("images.inserted", "legacy"),
        ("images.updated", "service"),
    ]


def test_legacy_write_in_table_stage_reaches_the_rows(table_stage: Conn) -> None:
    """Old app instances still writing JSONB are captured into the table."""
    c = table_stage
    pid = new_product(c, [img(A, 0)])
    write_images(c, pid, [img(B, 0), img(A, 1)])
    assert [(r[1], r[2]) for r in rows_of(c, pid)] == [(B, 0), (A, 1)]
    assert images_of(c, pid) == [img(B, 0), img(A, 1)]
    assert len(events_of(c, pid)) == 2


def test_multi_row_table_write_rewrites_every_product(table_stage: Conn) -> None:
    """One UPDATE over many products' rows rewrites each product's JSONB once."""
    c = table_stage
    ids = [r[0] for r in c.execute(f"SELECT id FROM {TENANT}.products").fetchall()]
    c.execute("SELECT imgmig.snapshot(%s, %s, 'backfill')", (TENANT, ids))
    c.execute(f"UPDATE {TENANT}.product_images SET tags = '{{bulk}}'")
    row = c.execute(
        f'SELECT count(*) FILTER (WHERE images @> \'[{{"tags": ["bulk"]}}]\') '
        f"FROM {TENANT}.products WHERE jsonb_array_length(images) > 0"
    ).fetchone()
    assert row == (len(ids),)
    assert all(in_sync(c, pid) for pid in ids)


def test_sync_flag_does_not_leak_into_the_transaction(table_stage: Conn) -> None:
    """After a synced write, imgmig.syncing is back to empty in the same transaction."""
    c = table_stage
    pid = new_product(c, [img(A, 0)])
    with c.transaction():
        c.execute(
            f"UPDATE {TENANT}.product_images SET alt_text = 'y' WHERE product_id = %s", (pid,)
        )
        write_images(c, pid, [img(C, 0)])
        row = c.execute("SELECT current_setting('imgmig.syncing', true)").fetchone()
    assert row == ("",)
    assert [r[1] for r in rows_of(c, pid)] == [C]


def test_table_write_waiting_on_another_keeps_its_change(
    table_stage: Conn, migrated_url: str
) -> None:
    """A table write that waits for another one on the same product keeps both in JSONB."""
    c = table_stage
    pid = new_product(c, [img(A, 0), img(B, 1)])
    edit = f"UPDATE {TENANT}.product_images SET alt_text = %s WHERE product_id = %s AND url = %s"
    seen: list[BaseException] = []
    with psycopg.connect(migrated_url) as first:
        first.execute(edit, ("first", pid, A))  # holds the product row until commit
        second = threading.Thread(target=_edit_once, args=(migrated_url, edit, pid, seen))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive()  # blocked behind the first transaction
        first.commit()
    second.join()
    assert seen == []
    assert [e.get("alt_text") for e in images_of(c, pid)] == ["first", "second"]


def _edit_once(url: str, edit: str, pid: int, seen: list[BaseException]) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(edit, ("second", pid, B))
    except BaseException as exc:  # surfaced by the test thread
        seen.append(exc)


def _edit_row(url: str, pid: int, row_url: str, rounds: int, seen: list[BaseException]) -> None:
    try:
        with psycopg.connect(url, autocommit=True) as c:
            for n in range(rounds):
                c.execute(
                    f"UPDATE {TENANT}.product_images SET alt_text = %s "
                    "WHERE product_id = %s AND url = %s",
                    (f"{row_url}-{n}", pid, row_url),
                )
    except BaseException as exc:  # surfaced by the test thread
        seen.append(exc)


def test_concurrent_table_writes_to_one_product_lose_nothing(
    table_stage: Conn, migrated_url: str
) -> None:
    """Two connections editing different rows of one product: the JSONB ends with both."""
    c = table_stage
    pid = new_product(c, [img(A, 0), img(B, 1)])
    seen: list[BaseException] = []
    threads = [
        threading.Thread(target=_edit_row, args=(migrated_url, pid, u, 25, seen)) for u in (A, B)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == []
    assert [e.get("alt_text") for e in images_of(c, pid)] == [f"{A}-24", f"{B}-24"]
    assert in_sync(c, pid)


def test_table_stage_refuses_deferred_projection(table_stage: Conn) -> None:
    """From stage table on the services write the table, and their reverse sync logs the
    product's new state: a legacy write still waiting in a deferred log would then be
    projected over, or lost under, their next write to the same product. So stage table
    keeps projection inline: deferred is refused there, and nothing changes."""
    c = table_stage
    with (
        pytest.raises(StageRefusedError, match="switch the tenant to inline"),
        c.transaction(),
    ):
        project.set_mode(c, TENANT, "deferred")
    assert capture.projection_of(c, TENANT) == "inline"
    assert capture.installed_triggers(c, TENANT) >= {s.name for s in capture.CAPTURE}


def test_a_deferred_tenant_cannot_enter_table(conn: Conn) -> None:
    """Entering stage table with deferred projection is refused, forced or not."""
    with conn.transaction():
        project.set_mode(conn, TENANT, "deferred")
    go(conn, "shadow_read")
    with pytest.raises(StageRefusedError, match="project deferred"), conn.transaction():
        cutover.change_stage(conn, TENANT, "table", reason="test", force=True)
    assert stage_mod.get(conn, TENANT).stage is Stage.SHADOW_READ
