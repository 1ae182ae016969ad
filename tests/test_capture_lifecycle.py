"""Triggers follow the stage: after every step forward and every step back, writes through
the old path (products.images) and the new path (product_images) land where they should."""

from __future__ import annotations

import pytest

from cdc import capture
from cdc.errors import InvalidStageError
from tests.capture_support import (
    TENANT,
    Conn,
    go,
    images_of,
    img,
    new_product,
    urls_of,
    write_images,
)

# stage -> (legacy JSONB writes reach the table, table writes reach the JSONB)
VISIBLE = {
    "jsonb": (False, False),
    "dual_write": (True, False),
    "shadow_read": (True, False),
    "table": (True, True),
}
FORWARD = ["dual_write", "shadow_read", "table"]
BACK = ["shadow_read", "dual_write", "jsonb"]


def check_stage(conn: Conn, stage: str, step: int) -> None:
    legacy_to_table, table_to_legacy = VISIBLE[stage]
    wanted = {t.name for t in capture.triggers_for(stage, "inline")}
    assert capture.installed_triggers(conn, TENANT) == wanted

    old_path = f"https://legacy/{step}.jpg"
    pid = new_product(conn, [img("https://seed/0.jpg", 0)], sku=f"life-{step}")
    write_images(conn, pid, [img("https://seed/0.jpg", 0), img(old_path, 1)])
    assert (old_path in urls_of(conn, pid)) is legacy_to_table

    new_path = f"https://service/{step}.jpg"
    conn.execute(
        f'INSERT INTO {TENANT}.product_images (product_id, url, "order") VALUES (%s, %s, 9)',
        (pid, new_path),
    )
    assert (new_path in [e["url"] for e in images_of(conn, pid)]) is table_to_legacy


@pytest.mark.parametrize("path", [FORWARD, FORWARD + BACK], ids=["forward", "and_back"])
def test_writes_visible_per_stage(conn: Conn, path: list[str]) -> None:
    """At each stage on the way (and back), each write path is visible where it should be."""
    check_stage(conn, "jsonb", 0)
    for step, stage in enumerate(path, start=1):
        go(conn, stage)
        check_stage(conn, stage, step)


def test_contracted_has_no_triggers(conn: Conn) -> None:
    """Stage contracted removes every imgmig trigger (the JSONB column is gone)."""
    for stage in [*FORWARD, "contracted"]:
        go(conn, stage)
    assert capture.installed_triggers(conn, TENANT) == set()


def test_rolled_back_stage_change_keeps_the_old_triggers(conn: Conn) -> None:
    """A stage change whose transaction rolls back leaves the trigger set as it was."""
    go(conn, "dual_write")
    with conn.transaction(force_rollback=True):
        capture.apply_stage(conn, TENANT, "table")
        assert len(capture.installed_triggers(conn, TENANT)) == 6
    assert capture.installed_triggers(conn, TENANT) == {t.name for t in capture.CAPTURE}


def test_reapplying_a_stage_issues_no_ddl(conn: Conn) -> None:
    """apply_stage is idempotent: the same stage twice changes nothing."""
    go(conn, "table")
    before = conn.execute(
        f"SELECT array_agg(oid ORDER BY oid) FROM pg_trigger WHERE tgrelid IN "
        f"('{TENANT}.products'::regclass, '{TENANT}.product_images'::regclass)"
    ).fetchone()
    with conn.transaction():
        capture.apply_stage(conn, TENANT, "table")
    after = conn.execute(
        f"SELECT array_agg(oid ORDER BY oid) FROM pg_trigger WHERE tgrelid IN "
        f"('{TENANT}.products'::regclass, '{TENANT}.product_images'::regclass)"
    ).fetchone()
    assert before == after


def test_deferred_mode_swaps_in_the_log_only_triggers(conn: Conn) -> None:
    """Switching projection swaps the capture triggers for the log-only ones, and back.
    (Stage table refuses deferred: tests/test_reverse_sync.py.)"""
    go(conn, "shadow_read")
    with conn.transaction():
        capture.set_projection(conn, TENANT, "deferred")
    assert capture.installed_triggers(conn, TENANT) == {t.name for t in capture.LOG_ONLY}
    with conn.transaction():
        capture.set_projection(conn, TENANT, "inline")
    assert capture.installed_triggers(conn, TENANT) == {t.name for t in capture.CAPTURE}


def test_unknown_stage_is_refused(conn: Conn) -> None:
    """apply_stage rejects a stage outside the lifecycle."""
    with pytest.raises(InvalidStageError):
        capture.apply_stage(conn, TENANT, "nope")
