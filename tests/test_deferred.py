"""Deferred projection: the trigger only logs; the projector applies events later."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from typing import Any

import psycopg

from cdc import backfill, project
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
    urls_of,
    write_images,
)

A, B, C, D = (f"https://cdn.example/{x}.jpg" for x in "abcd")
OTHER = "user_2"


def deferred(conn: Conn, tenant: str = TENANT) -> None:
    with conn.transaction():
        project.set_mode(conn, tenant, "deferred")
    go(conn, "dual_write", tenant)


def test_trigger_only_logs_until_the_projector_runs(conn: Conn) -> None:
    """In deferred mode a write changes no row; the projector then applies it."""
    deferred(conn)
    pid = new_product(conn, [img(A, 0)])
    write_images(conn, pid, [img(B, 0), img(A, 1)])
    assert rows_of(conn, pid) == []
    assert project.lag(conn, TENANT).pending >= 2
    assert project.project(conn, TENANT) >= 1
    assert urls_of(conn, pid) == [B, A]
    assert project.lag(conn, TENANT).pending == 0


def test_log_events_carry_what_the_projector_reads_under_any_search_path(conn: Conn) -> None:
    """The per-tenant log function names everything qualified: it logs the same events
    with an empty search_path (where any unqualified name would fail to resolve). Before
    any backfill an update's event keeps 'before' too: it is the only copy of it."""
    deferred(conn)
    conn.execute("SET search_path = ''")
    pid = new_product(conn, [img(A, 0)])
    write_images(conn, pid, [img(A, 0), img(B, 1)])
    conn.execute(f"DELETE FROM {TENANT}.products WHERE id = %s", (pid,))
    conn.execute("RESET search_path")
    assert [(kind, payload, source) for kind, payload, source in events_of(conn, pid)] == [
        ("images.inserted", {"op": "inserted", "before": None, "after": [img(A, 0)]}, "legacy"),
        ("images.updated", {"op": "updated", "before": [img(A, 0)],
                            "after": [img(A, 0), img(B, 1)]}, "legacy"),
        ("images.deleted", {"op": "deleted", "before": [img(A, 0), img(B, 1)], "after": None},
         "legacy"),
    ]  # fmt: skip
    fn = conn.execute(
        "SELECT p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND p.proname = 'imgmig_log_products_row'",
        (TENANT,),
    ).fetchone()
    assert fn is not None
    assert fn[0] is None  # no SET clause: nothing to save and restore per write


def test_update_events_drop_before_once_the_backfill_completed_the_log(
    conn: Conn, migrated_url: str
) -> None:
    """After a finished backfill (a snapshot of every product, capture on since), an
    update's event carries 'after' only; back at jsonb and forward again, the log has a
    gap, so 'before' comes back until the next backfill finishes."""
    deferred(conn)
    pid = new_product(conn, [img(A, 0)])

    arrays = itertools.cycle([[img(B, 0), img(A, 1)], [img(A, 0), img(B, 1)]])

    def last_update_payload() -> Any:
        write_images(conn, pid, next(arrays))
        return events_of(conn, pid)[-1][1]

    assert "before" in last_update_payload()
    backfill.run(migrated_url, [TENANT], backfill.BackfillConfig(workers=1), Silent())
    assert set(last_update_payload()) == {"op", "after"}
    go(conn, "jsonb")
    go(conn, "dual_write")
    assert "before" in last_update_payload()
    backfill.run(migrated_url, [TENANT], backfill.BackfillConfig(workers=1), Silent())
    assert set(last_update_payload()) == {"op", "after"}


def script(conn: Conn, tenant: str) -> dict[str, Any]:
    """The same writes in any tenant; returns sku -> product id."""
    ids = {f"s{n}": new_product(conn, [img(A, 0)], tenant=tenant, sku=f"s{n}") for n in range(5)}
    write_images(conn, ids["s0"], [img(A, 0), img(B, 1)], tenant)
    write_images(conn, ids["s0"], [img(B, 0), img(A, 1), img(C, 2, is_label=True)], tenant)
    write_images(conn, ids["s1"], [{"url": D}, {"url": A, "order": 0}], tenant)
    write_images(conn, ids["s2"], {"not": "an array"}, tenant)
    conn.execute(f"DELETE FROM {tenant}.products WHERE id = %s", (ids.pop("s3"),))
    write_images(conn, ids["s4"], [img(C, 0)] * 3, tenant)
    return ids


def table_by_sku(conn: Conn, tenant: str, ids: dict[str, Any]) -> dict[str, Any]:
    return {sku: [r[1:] for r in rows_of(conn, pid, tenant)] for sku, pid in ids.items()}


def test_deferred_converges_to_the_inline_table(conn: Conn) -> None:
    """The same writes give the same rows inline (user_1) and deferred-then-projected."""
    go(conn, "dual_write")
    deferred(conn, OTHER)
    inline_ids = script(conn, TENANT)
    deferred_ids = script(conn, OTHER)
    project.project(conn, OTHER)
    assert table_by_sku(conn, TENANT, inline_ids) == table_by_sku(conn, OTHER, deferred_ids)
    assert all(in_sync(conn, pid, OTHER) for pid in deferred_ids.values())


def test_projector_is_idempotent(conn: Conn) -> None:
    """Running the projector again changes nothing, row ids included."""
    deferred(conn)
    ids = script(conn, TENANT)
    project.project(conn, TENANT)
    first = {pid: rows_of(conn, pid) for pid in ids.values()}
    project.project(conn, TENANT)
    assert {pid: rows_of(conn, pid) for pid in ids.values()} == first


def test_projector_catches_a_late_commit(conn: Conn, migrated_url: str) -> None:
    """An event committed after a run with a lower seq is still applied by the next run."""
    deferred(conn)
    late, early = new_product(conn, [], sku="late"), new_product(conn, [], sku="early")
    with psycopg.connect(migrated_url) as other:
        write_images(other, late, [img(A, 0)])  # open transaction, logged first
        write_images(conn, early, [img(B, 0)])
        project.project(conn, TENANT)
        assert (urls_of(conn, late), urls_of(conn, early)) == ([], [B])
        other.commit()
    project.project(conn, TENANT)
    assert urls_of(conn, late) == [A]


def imgmig(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cdc", "--database-url", url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_project_command(conn: Conn, migrated_url: str) -> None:
    """`imgmig project --tenant T` runs the projector and reports what is pending."""
    deferred(conn)
    pid = new_product(conn, [img(A, 0)])
    result = imgmig(migrated_url, "project", "-t", TENANT)
    assert result.returncode == 0, result.stderr
    assert "0 events pending" in result.stdout
    assert urls_of(conn, pid) == [A]


def test_project_command_switches_back_to_inline(conn: Conn, migrated_url: str) -> None:
    """`imgmig project --mode inline` applies what is pending and captures inline again."""
    deferred(conn)
    pid = new_product(conn, [img(A, 0)])
    result = imgmig(migrated_url, "project", "--all", "--mode", "inline")
    assert result.returncode == 0, result.stderr
    assert urls_of(conn, pid) == [A]
    write_images(conn, pid, [img(B, 0)])
    assert urls_of(conn, pid) == [B]


def test_concurrent_log_function_rewrites_queue_instead_of_failing(
    conn: Conn, migrated_url: str
) -> None:
    """Two transactions rewriting one tenant's log function (the backfill finishing while
    a stage change reinstalls the triggers) run one after the other; neither fails."""
    with psycopg.connect(migrated_url) as first, psycopg.connect(migrated_url) as second:
        first.execute("SELECT imgmig.install_log_function(%s, false)", (TENANT,))
        second_pid = second.info.backend_pid
        errors: list[BaseException] = []

        def rewrite() -> None:
            try:
                second.execute("SELECT imgmig.install_log_function(%s, true)", (TENANT,))
                second.commit()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=rewrite)
        worker.start()
        waiting = False
        for _ in range(200):
            row = conn.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (second_pid,)
            ).fetchone()
            if row is not None and row[0] == "Lock":
                waiting = True
                break
            threading.Event().wait(0.05)
        first.commit()
        worker.join()
    assert waiting  # the second rewrite queued behind the first
    assert errors == []
    fn = conn.execute(
        "SELECT pg_get_functiondef(%s::regprocedure)", (f"{TENANT}.imgmig_log_products_row()",)
    ).fetchone()
    assert fn is not None
    assert "'before', OLD.images, 'after', NEW.images" in str(fn[0])  # the last one won


def test_back_to_inline_projects_what_is_pending_in_the_same_transaction(conn: Conn) -> None:
    """Switching to inline leaves no event pending, even one logged after the projector's
    last run: nothing projects an inline tenant's log later, and at stage table the
    reconciler would take the table without it for the truth."""
    deferred(conn)
    pid = new_product(conn, [img(A, 0)])
    assert project.project(conn, TENANT) >= 1
    write_images(conn, pid, [img(A, 0), img(B, 1)])  # logged after the projector ran
    assert project.lag(conn, TENANT).pending == 1
    with conn.transaction():
        project.set_mode(conn, TENANT, "inline")
    assert project.lag(conn, TENANT).pending == 0
    assert urls_of(conn, pid) == [A, B]
    assert in_sync(conn, pid)
