"""Capture v5: the inline trigger's short cuts for append, drop-last and reorder.

The oracle is the diff (``imgmig.project``): after every legacy write, projecting the
product's array again must find nothing to do. A short cut that inserted, moved or
deleted the wrong row, lost a row's table-only metadata or its id, would leave the diff
work to do.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from cdc import backfill, migrate
from cdc.capture import CAPTURE_V2
from cdc.progress import Silent
from tests.capture_support import (
    TENANT,
    Conn,
    events_of,
    go,
    img,
    in_sync,
    new_product,
    rows_of,
    table,
    write_images,
)

URLS = [f"https://cdn.example/{c}.jpg" for c in "abcdefghij"]


def diff_work(conn: Conn, pid: int) -> int:
    """Rows the diff would still change for the product's current array (0: none)."""
    row = conn.execute(
        sql.SQL(
            "SELECT imgmig.project(%s, ARRAY[p.id], ARRAY[p.images]) FROM {} p WHERE p.id = %s"
        ).format(table(TENANT, "products")),
        (TENANT, pid),
    ).fetchone()
    assert row is not None
    return int(row[0])


def ids(conn: Conn, pid: int) -> dict[str, int]:
    """url -> row id (for products whose urls are unique)."""
    return {str(r[1]): int(r[0]) for r in rows_of(conn, pid)}


def tag_rows(conn: Conn, pid: int) -> None:
    """Give the product's rows table-only metadata, as the service or labelling would."""
    conn.execute(
        sql.SQL(
            "UPDATE {images} r SET alt_text = coalesce(r.alt_text, 'kept ' || r.\"order\"), "
            'is_label = r.is_label OR (r."order" = 0 AND NOT EXISTS ('
            "SELECT 1 FROM {images} x WHERE x.product_id = r.product_id AND x.is_label)), "
            "label_strategy = 'manual', label_confidence = 1 WHERE r.product_id = %s"
        ).format(images=table(TENANT, "product_images")),
        (pid,),
    )


def renumber(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "order": i} for i, e in enumerate(images)]


@pytest.fixture
def inline(conn: Conn) -> Conn:
    go(conn, "dual_write")
    return conn


def test_the_three_edits_keep_ids_and_table_only_metadata(inline: Conn) -> None:
    pid = new_product(inline, [img(u, i) for i, u in enumerate(URLS[:4])])
    tag_rows(inline, pid)
    before = rows_of(inline, pid)
    first = ids(inline, pid)
    # reorder: the first two swapped
    write_images(
        inline, pid, renumber([img(URLS[1], 0), img(URLS[0], 0), *[img(u, 0) for u in URLS[2:4]]])
    )
    assert ids(inline, pid) == first
    assert [r[1] for r in rows_of(inline, pid)] == [URLS[1], URLS[0], URLS[2], URLS[3]]
    assert {r[0]: r[3:5] for r in rows_of(inline, pid)} == {r[0]: r[3:5] for r in before}
    # append
    write_images(
        inline, pid, renumber([img(u, 0) for u in (URLS[1], URLS[0], URLS[2], URLS[3], URLS[4])])
    )
    assert {u: first[u] for u in URLS[:4]} == {
        u: i for u, i in ids(inline, pid).items() if u in first
    }
    appended = rows_of(inline, pid)[-1]
    assert appended[1:5] == (URLS[4], 4, False, None)
    # drop the last two, one at a time
    write_images(inline, pid, renumber([img(u, 0) for u in (URLS[1], URLS[0], URLS[2], URLS[3])]))
    write_images(inline, pid, renumber([img(u, 0) for u in (URLS[1], URLS[0], URLS[2])]))
    assert ids(inline, pid) == {u: first[u] for u in URLS[:3]}
    assert diff_work(inline, pid) == 0  # (not in_sync: the table-only metadata differs)
    kinds = [k for k, _, _ in events_of(inline, pid)]
    assert kinds == ["images.inserted"] + ["images.updated"] * 4


def test_a_drifted_product_is_projected_whole(inline: Conn) -> None:
    """The short cuts check the rows they stand on; drift sends the write to the diff."""
    pid = new_product(inline, [img(u, i) for i, u in enumerate(URLS[:3])])
    images = table(TENANT, "product_images")
    inline.execute(
        sql.SQL('DELETE FROM {} WHERE product_id = %s AND "order" = 1').format(images), (pid,)
    )
    write_images(inline, pid, [img(u, i) for i, u in enumerate(URLS[:4])])  # an append
    assert in_sync(inline, pid)
    inline.execute(
        sql.SQL('UPDATE {} SET url = %s WHERE product_id = %s AND "order" = 0').format(images),
        ("https://cdn.example/wrong.jpg", pid),
    )
    write_images(inline, pid, renumber([img(u, 0) for u in (URLS[1], URLS[0], URLS[2], URLS[3])]))
    assert in_sync(inline, pid)  # the reorder found a row it did not expect
    inline.execute(sql.SQL("DELETE FROM {} WHERE product_id = %s").format(images), (pid,))
    write_images(inline, pid, renumber([img(u, 0) for u in (URLS[1], URLS[0], URLS[2])]))
    assert in_sync(inline, pid)  # no rows at all (before its backfill): projected whole


def test_a_multi_row_update_projects_every_product(inline: Conn) -> None:
    products = table(TENANT, "products")
    pids = [
        new_product(inline, [img(URLS[0], 0), img(URLS[1], 1)], sku=f"M-{i}") for i in range(300)
    ]
    inline.execute(
        sql.SQL(
            "UPDATE {} SET images = images || jsonb_build_array(jsonb_build_object("
            "'url', 'https://cdn.example/m' || id || '.jpg', 'order', 2, "
            "'created_at', '2025-03-01T12:00:00.000000Z')) WHERE id = ANY (%s)"
        ).format(products),
        (pids,),
    )
    assert all(in_sync(inline, pid) for pid in pids)
    assert all(len(rows_of(inline, pid)) == 3 for pid in pids)


def test_update_events_drop_before_once_the_backfill_completed_the_log(
    inline: Conn, migrated_url: str
) -> None:
    """As in deferred mode (capture v3): 'after' only once the log is complete."""
    pid = new_product(inline, [img(URLS[0], 0)])
    arrays = itertools.cycle(
        [[img(URLS[1], 0), img(URLS[0], 1)], [img(URLS[0], 0), img(URLS[1], 1)]]
    )

    def last_update_payload() -> Any:
        write_images(inline, pid, next(arrays))
        return events_of(inline, pid)[-1][1]

    assert "before" in last_update_payload()
    backfill.run(migrated_url, [TENANT], backfill.BackfillConfig(workers=1), Silent())
    assert set(last_update_payload()) == {"op", "after"}
    assert in_sync(inline, pid)
    go(inline, "jsonb")
    go(inline, "dual_write")
    assert "before" in last_update_payload()


def capture_function_of(conn: Conn) -> tuple[str, bool] | None:
    """(function, row-level?) of the tenant's inline UPDATE trigger."""
    row = conn.execute(
        "SELECT n.nspname || '.' || p.proname, (t.tgtype & 1) = 1 FROM pg_trigger t "
        "JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE t.tgrelid = to_regclass(%s) AND t.tgname = 'imgmig_capture_upd'",
        (f"{TENANT}.products",),
    ).fetchone()
    return (str(row[0]), bool(row[1])) if row else None


def test_revision_0007_swaps_the_triggers_in_place_and_back(
    inline: Conn, migrated_url: str
) -> None:
    assert capture_function_of(inline) == (f"{TENANT}.imgmig_capture_products_row", True)
    migrate.downgrade(migrated_url, "0006_logical", tenants=[TENANT])
    assert capture_function_of(inline) == ("imgmig.capture_products", False)
    pid = new_product(inline, [img(URLS[0], 0)])  # v2's statement trigger projects
    write_images(inline, pid, [img(URLS[0], 0), img(URLS[1], 1)])
    assert in_sync(inline, pid)
    migrate.downgrade(migrated_url, "0006_logical")
    exists = "SELECT to_regprocedure('imgmig.install_capture_function(text, boolean)') IS NOT NULL"
    assert inline.execute(exists).fetchone() == (False,)
    go(inline, "jsonb")
    go(inline, "dual_write")  # the SQL predates v5: v2's triggers again
    assert capture_function_of(inline) == ("imgmig.capture_products", False)
    migrate.upgrade(migrated_url)
    assert inline.execute(exists).fetchone() == (True,)
    assert capture_function_of(inline) == (f"{TENANT}.imgmig_capture_products_row", True)
    write_images(inline, pid, [img(URLS[1], 0), img(URLS[0], 1)])
    assert in_sync(inline, pid)
    assert diff_work(inline, pid) == 0


# --- generated edit sequences -------------------------------------------------------

ELEMENT = st.builds(
    lambda url, extra: {"url": url, **extra},
    st.sampled_from(URLS[:6]),  # repeats: duplicate urls happen
    st.fixed_dictionaries(
        {},
        optional={
            "alt_text": st.sampled_from(["front", "back"]),
            "is_label": st.booleans(),
            "width": st.integers(1, 3),
            "created_at": st.just("2025-03-01T12:00:00.000000Z"),
        },
    ),
)


@st.composite
def edits(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """A starting array and the arrays a legacy app then writes, one edit at a time."""
    current = renumber(draw(st.lists(ELEMENT, min_size=0, max_size=5)))
    start = current
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["append", "drop", "swap", "move", "change", "raw"]))
        nxt = [dict(e) for e in current]
        if kind == "append":
            nxt.append(draw(ELEMENT))
        elif kind == "drop" and nxt:
            nxt.pop()
        elif kind in ("swap", "move") and len(nxt) >= 2:
            i, j = draw(st.lists(st.integers(0, len(nxt) - 1), min_size=2, max_size=2, unique=True))
            if kind == "swap":
                nxt[i], nxt[j] = nxt[j], nxt[i]
            else:
                nxt.insert(j, nxt.pop(i))
        elif kind == "change" and nxt:
            nxt[draw(st.integers(0, len(nxt) - 1))] = draw(ELEMENT)
        elif kind == "raw":  # orders left as they were: not clean
            steps.append(nxt[::-1])
            current = nxt[::-1]
            continue
        current = renumber(nxt)
        steps.append(current)
    return start, steps


def state(conn: Conn, pid: int) -> list[tuple[Any, ...]]:
    """The product's rows, ids as their rank (which rows survived, which are new)."""
    rows = conn.execute(
        sql.SQL(
            'SELECT id, url, "order", is_label, alt_text, tags, width, extra, label_strategy '
            'FROM {} WHERE product_id = %s ORDER BY "order", id'
        ).format(table(TENANT, "product_images")),
        (pid,),
    ).fetchall()
    rank = {row_id: n for n, row_id in enumerate(sorted(r[0] for r in rows))}
    return [(rank[r[0]], *r[1:]) for r in rows]


def play(conn: Conn, start: list[Any], steps: list[Any], tagged: bool, sku: str) -> list[Any]:
    """Write ``steps`` to a new product; the rows and events after each write."""
    pid = new_product(conn, start, sku=sku)
    if tagged:  # then the diff has its say where the array's own keys decide (a label
        tag_rows(conn, pid)  # flag set false, say): the rows start in step with it
        diff_work(conn, pid)
    seen = []
    for images in steps:
        write_images(conn, pid, images)
        assert diff_work(conn, pid) == 0, images
        seen.append((state(conn, pid), [e[:2] for e in events_of(conn, pid)]))
    return seen


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=edits(), tagged=st.booleans())
def test_every_write_leaves_what_the_v2_diff_trigger_leaves(
    inline: Conn, case: tuple[list[dict[str, Any]], list[list[dict[str, Any]]]], tagged: bool
) -> None:
    """The same writes through v5's row trigger and through v2's statement trigger (the
    diff on every write) leave the same rows, the same surviving rows and the same events;
    and after each, the diff finds nothing left to do."""
    start, steps = case
    with inline.transaction(force_rollback=True):
        through_v5 = play(inline, start, steps, tagged, "V5")
        for spec in CAPTURE_V2:
            inline.execute(spec.create(TENANT, replace=True))
        through_v2 = play(inline, start, steps, tagged, "V2")
    assert through_v5 == through_v2
