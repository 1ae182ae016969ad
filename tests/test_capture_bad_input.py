"""Bad input never breaks a legacy write: project what we can, log the original value."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg import errors

from cdc import project
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

BIG = [img(f"https://cdn.example/{n}.jpg", n) for n in range(10_000)]
SQLISH = "https://x/'); DROP TABLE products; --.jpg"

CASES: list[tuple[str, Any, list[str], int]] = [
    # (name, value written, problems recorded, rows projected)
    ("object", {"url": "https://x/a.jpg", "order": 0}, ["not_array"], 0),
    ("string", "https://x/a.jpg", ["not_array"], 0),
    ("json_null", None, ["null"], 0),
    (
        "no_url",
        [img("https://x/a.jpg", 0), {"order": 1}, {"url": 5, "order": 2}],
        ["element_without_url"],
        1,
    ),
    ("not_objects", [img("https://x/a.jpg", 0), 7, [1], None], ["element_not_object"], 1),
    (
        "duplicate_order",
        [img("https://x/a.jpg", 0), img("https://x/b.jpg", 0)],
        ["order_duplicate", "order_renumbered"],
        2,
    ),
    (
        "missing_order",
        [{"url": "https://x/a.jpg"}, {"url": "https://x/b.jpg"}],
        ["order_missing", "order_renumbered"],
        2,
    ),
    ("unicode", [img("https://x/é漢字🙂.jpg", 0, alt_text="ünïcødé ✓ \u202e rtl")], [], 1),
    ("sql_looking", [img(SQLISH, 0, alt_text="1; DELETE FROM product_images")], [], 1),
    ("wrong_types", [img("https://x/a.jpg", 0, width="wide", tags="t", is_label="yes")], [], 1),
    ("duplicate_url", [img("https://x/a.jpg", 0), img("https://x/a.jpg", 1)], [], 2),
]


@pytest.mark.parametrize(
    ("value", "problems", "projected"),
    [pytest.param(v, p, n, id=name) for name, v, p, n in CASES],
)
def test_bad_value_is_written_projected_and_recorded(
    conn: Conn, value: Any, problems: list[str], projected: int
) -> None:
    """The legacy UPDATE succeeds; rows hold what was usable; problems are logged."""
    go(conn, "dual_write")
    pid = new_product(conn, [img("https://x/old.jpg", 0)])
    write_images(conn, pid, value)
    assert images_of(conn, pid) == value
    assert len(rows_of(conn, pid)) == projected
    assert in_sync(conn, pid)
    kinds = {e[0]: e[1] for e in events_of(conn, pid)}
    assert kinds["images.updated"]["after"] == value
    if problems:
        assert kinds["images.malformed"] == {"problems": problems, "original": value}
    else:
        assert "images.malformed" not in kinds


def test_ten_thousand_elements(conn: Conn) -> None:
    """A 10,000-element array is captured and projected in full."""
    go(conn, "dual_write")
    pid = new_product(conn, [])
    write_images(conn, pid, BIG)
    assert len(rows_of(conn, pid)) == 10_000
    assert in_sync(conn, pid)


def test_projection_failure_keeps_the_write_and_logs_it(conn: Conn) -> None:
    """When projecting fails, the write still commits and capture_failed names the error."""
    go(conn, "dual_write")
    conn.execute(
        f"ALTER TABLE {TENANT}.product_images ADD CONSTRAINT no_boom CHECK (url <> 'boom')"
    )
    pid = new_product(conn, [img("https://x/a.jpg", 0)])
    write_images(conn, pid, [img("boom", 0)])
    assert images_of(conn, pid) == [img("boom", 0)]
    assert [r[1] for r in rows_of(conn, pid)] == ["https://x/a.jpg"]  # left for reconcile
    kinds = {e[0]: e[1] for e in events_of(conn, pid)}
    assert kinds["images.updated"]["after"] == [img("boom", 0)]
    assert "no_boom" in kinds["images.capture_failed"]["error"]


def test_sql_text_is_data_not_code(conn: Conn) -> None:
    """SQL-looking urls are stored verbatim; no table is harmed."""
    go(conn, "dual_write")
    pid = new_product(conn, [img(SQLISH, 0)])
    assert rows_of(conn, pid)[0][1] == SQLISH
    assert conn.execute(f"SELECT count(*) > 0 FROM {TENANT}.products").fetchone() == (True,)


def test_cancel_is_not_swallowed(conn: Conn) -> None:
    """A statement timeout still cancels the write (only errors from data are absorbed)."""
    go(conn, "dual_write")
    pid = new_product(conn, [])

    def slow_write() -> None:
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '1ms'")
            write_images(conn, pid, BIG * 3)

    with pytest.raises(errors.QueryCanceled):
        slow_write()
    assert images_of(conn, pid) == []


def test_deferred_mode_records_problems_when_it_projects(conn: Conn) -> None:
    """Deferred: the write is kept and logged as is; the projector, which projects in that
    mode, records the problem (naming the change event) once, however often it runs."""
    with conn.transaction():
        project.set_mode(conn, TENANT, "deferred")
    go(conn, "dual_write")
    pid = new_product(conn, [img("https://x/a.jpg", 0)])
    bad = [{"order": 0}, img("https://x/b.jpg", 1)]
    write_images(conn, pid, bad)
    assert [e[0] for e in events_of(conn, pid)] == ["images.inserted", "images.updated"]
    project.project(conn, TENANT)
    project.project(conn, TENANT)
    seq = conn.execute(
        "SELECT max(seq) FROM user_1.image_events WHERE aggregateid = %s::text "
        "AND type = 'images.updated'",
        (pid,),
    ).fetchone()
    malformed = [e for e in events_of(conn, pid) if e[0] == "images.malformed"]
    assert [(e[1], e[2]) for e in malformed] == [
        (
            {
                "problems": ["element_without_url", "order_renumbered"],
                "original": bad,
                "event": seq[0] if seq else None,
            },
            "legacy",
        )
    ]
    assert [r[1] for r in rows_of(conn, pid)] == ["https://x/b.jpg"]


def test_projector_does_not_classify_again_what_the_inline_trigger_did(conn: Conn) -> None:
    """A malformed write made inline is recorded by the trigger; after a switch to deferred
    the projector's window still holds that transaction and leaves it alone."""
    go(conn, "dual_write")
    pid = new_product(conn, [img("https://x/a.jpg", 0)])
    write_images(conn, pid, [{"order": 0}, img("https://x/b.jpg", 1)])
    with conn.transaction():
        project.set_mode(conn, TENANT, "deferred")
    project.project(conn, TENANT)
    kinds = [e[0] for e in events_of(conn, pid)]
    assert kinds.count("images.malformed") == 1
