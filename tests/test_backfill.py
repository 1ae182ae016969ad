"""Backfill: exact projection, checkpoints, pause, locks, bad input, lost connections."""

from __future__ import annotations

import io
import threading
import time

import psycopg
import pytest
from psycopg import sql
from rich.console import Console
from structlog.testing import capture_logs

from cdc import backfill, checkpoint, locks, progress
from cdc.db import connect
from cdc.errors import StageRefusedError, TenantBusyError, UnknownTenantError
from cdc.progress import Silent
from tests.backfill_helpers import (
    TENANTS,
    duplicate_orders,
    exact_mismatches,
    ident,
    scalar,
    set_stage,
)

SMALL_BATCHES = backfill.BackfillConfig(batch_size=40, workers=2)


def test_backfill_projects_every_product_exactly(migrated_url: str) -> None:
    """Every tenant's rows equal the canonical mapping of its JSONB, and each is done."""
    set_stage(migrated_url, "dual_write")
    results = backfill.run(migrated_url, None, SMALL_BATCHES, Silent())
    assert sorted(r.tenant for r in results) == sorted(TENANTS)
    assert all(r.status == "done" for r in results)
    with connect(migrated_url, autocommit=True) as conn:
        for tenant in TENANTS:
            assert exact_mismatches(conn, tenant) == 0
            assert duplicate_orders(conn, tenant) == 0
            cp = checkpoint.read(conn, tenant)
            assert cp is not None
            assert cp.status == "done"
            products = scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(
                ident(tenant, "products")))  # fmt: skip
            assert cp.products_done == products


def test_backfill_refuses_a_tenant_without_capture(migrated_url: str) -> None:
    """A tenant still at stage jsonb is refused, and the message says why."""
    with pytest.raises(StageRefusedError) as info:
        backfill.run(migrated_url, ["user_1"], SMALL_BATCHES, Silent())
    assert info.value.stage == "jsonb"
    assert "no change capture" in str(info.value)


def test_backfill_all_skips_tenants_without_capture(migrated_url: str) -> None:
    """--all backfills the tenants in dual_write and leaves the jsonb ones alone."""
    set_stage(migrated_url, "dual_write", ("user_2",))
    results = backfill.run(migrated_url, None, SMALL_BATCHES, Silent())
    assert [r.tenant for r in results] == ["user_2"]


def test_backfill_unknown_tenant_is_a_typed_error(migrated_url: str) -> None:
    """An unknown tenant is refused before anything runs."""
    with pytest.raises(UnknownTenantError):
        backfill.run(migrated_url, ["user_99"], SMALL_BATCHES, Silent())


def test_backfill_refused_while_another_run_holds_the_tenant(migrated_url: str) -> None:
    """A second run on a tenant that another run holds exits at once."""
    set_stage(migrated_url, "dual_write", ("user_1",))
    with connect(migrated_url, autocommit=True, application_name="first-run") as holder:
        assert locks.try_lock(holder, "user_1")
        with pytest.raises(TenantBusyError) as info:
            backfill.run(migrated_url, ["user_1"], SMALL_BATCHES, Silent())
    assert info.value.exit_code == 75
    assert "first-run" in str(info.value)


def test_done_tenant_is_skipped_and_restart_redoes_it(migrated_url: str) -> None:
    """A second run leaves a done tenant alone; --restart walks it again."""
    set_stage(migrated_url, "dual_write", ("user_5",))
    backfill.run(migrated_url, ["user_5"], SMALL_BATCHES, Silent())
    again = Silent()
    backfill.run(migrated_url, ["user_5"], SMALL_BATCHES, again)
    assert again.batches == []
    redo = Silent()
    config = backfill.BackfillConfig(batch_size=40, restart=True)
    backfill.run(migrated_url, ["user_5"], config, redo)
    assert sum(b.products for b in redo.batches) == 30
    with connect(migrated_url, autocommit=True) as conn:
        assert exact_mismatches(conn, "user_5") == 0


def test_pause_switch_is_honoured_between_batches(migrated_url: str) -> None:
    """While paused no batch runs; resume lets the backfill finish."""
    set_stage(migrated_url, "dual_write", ("user_5",))
    backfill.pause(migrated_url)
    seen = Silent()
    config = backfill.BackfillConfig(batch_size=10, pause_poll_s=0.05)
    worker = threading.Thread(target=backfill.run, args=(migrated_url, ["user_5"], config, seen))
    worker.start()
    deadline = time.monotonic() + 10
    while not seen.pauses and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen.pauses == ["user_5"]
    assert seen.batches == []
    backfill.resume(migrated_url)
    worker.join(timeout=30)
    assert sum(b.products for b in seen.batches) == 30


def test_malformed_elements_are_recorded_and_the_rest_migrated(migrated_url: str) -> None:
    """A malformed element gets an event keeping the original; its siblings are migrated."""
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        good = scalar(conn, sql.SQL("SELECT jsonb_array_length(images) FROM {} WHERE id = 1")
                      .format(ident("user_1", "products")))  # fmt: skip
        conn.execute(
            sql.SQL("""UPDATE {} SET images = images || '[42, {{"order": 9}}]' WHERE id = 1""")
            .format(ident("user_1", "products"))
        )  # fmt: skip
    set_stage(migrated_url, "dual_write", ("user_1",))
    results = backfill.run(migrated_url, ["user_1"], SMALL_BATCHES, Silent())
    assert results[0].malformed >= 1
    with connect(migrated_url, autocommit=True) as conn:
        events = scalar(conn, sql.SQL(
            "SELECT count(*) FROM {} WHERE type = 'images.malformed' AND source = 'backfill' "
            "AND aggregateid = '1' AND payload -> 'original' @> '[42]'"
        ).format(ident("user_1", "image_events")))  # fmt: skip
        assert events == 1
        rows = scalar(conn, sql.SQL("SELECT count(*) FROM {} WHERE product_id = 1")
                      .format(ident("user_1", "product_images")))  # fmt: skip
        assert rows == good
        assert exact_mismatches(conn, "user_1") == 0


def test_lost_connection_mid_batch_rolls_back_and_resumes(migrated_url: str) -> None:
    """A backend killed inside a batch loses that batch only; the run resumes and ends exact."""
    set_stage(migrated_url, "dual_write", ("user_1",))
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        # Kill the backfill's own backend on its 2nd statement-level insert; nextval is
        # not transactional, so the kill fires once and the retry goes through.
        conn.execute("CREATE SEQUENCE public.kill_once")
        conn.execute(
            """CREATE FUNCTION public.kill_once() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF current_setting('application_name') = 'imgmig-backfill'
                    AND nextval('public.kill_once') = 2 THEN
                   PERFORM pg_terminate_backend(pg_backend_pid());
                 END IF;
                 RETURN NULL;
               END $$"""
        )
        conn.execute(
            "CREATE TRIGGER kill_once AFTER INSERT ON user_1.product_images "
            "FOR EACH STATEMENT EXECUTE FUNCTION public.kill_once()"
        )
    results = backfill.run(migrated_url, ["user_1"], SMALL_BATCHES, Silent())
    assert results[0].status == "done"
    assert results[0].reconnects == 1
    with connect(migrated_url, autocommit=True) as conn:
        assert exact_mismatches(conn, "user_1") == 0
        assert duplicate_orders(conn, "user_1") == 0


def test_stage_rolled_back_mid_run_stops_the_backfill(migrated_url: str) -> None:
    """Moving the tenant back to jsonb while it runs stops it before the next batch."""
    set_stage(migrated_url, "dual_write", ("user_1",))
    backfill.pause(migrated_url)
    seen = Silent()
    config = backfill.BackfillConfig(batch_size=10, pause_poll_s=0.05)
    results: list[backfill.TenantResult] = []
    worker = threading.Thread(
        target=lambda: results.extend(backfill.run(migrated_url, ["user_1"], config, seen))
    )
    worker.start()
    deadline = time.monotonic() + 10
    while not seen.pauses and time.monotonic() < deadline:
        time.sleep(0.02)
    set_stage(migrated_url, "jsonb", ("user_1",))
    backfill.resume(migrated_url)
    worker.join(timeout=30)
    assert results[0].status == "failed"
    assert "stage changed" in (results[0].error or "")
    with connect(migrated_url, autocommit=True) as conn:
        cp = checkpoint.read(conn, "user_1")
    assert cp is not None
    assert cp.status == "running"


def test_progress_bars_and_json_lines_report_each_tenant(migrated_url: str) -> None:
    """A terminal gets Rich bars per tenant; elsewhere each tenant logs start and finish."""
    set_stage(migrated_url, "dual_write", ("user_4", "user_5"))
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with progress.bars(console) as bars:
        backfill.run(migrated_url, ["user_4"], SMALL_BATCHES, bars)
    text = screen.getvalue()
    assert "user_4" in text
    assert "products/s" in text
    with capture_logs() as logs:
        backfill.run(migrated_url, ["user_5"], SMALL_BATCHES, progress.LogLines())
    events = [(e["event"], e.get("tenant")) for e in logs]
    assert ("backfill started", "user_5") in events
    finished = [e for e in logs if e["event"] == "backfill finished"]
    assert finished[0]["status"] == "done"
    assert finished[0]["products"] == 30


def test_backfill_starts_over_after_a_capture_gap(migrated_url: str) -> None:
    """A done tenant rolled back to jsonb and forward again is walked again from the start."""
    set_stage(migrated_url, "dual_write", ("user_5",))
    backfill.run(migrated_url, ["user_5"], SMALL_BATCHES, Silent())
    set_stage(migrated_url, "jsonb", ("user_5",))
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET images = images - 0 WHERE id <= 10").format(
                ident("user_5", "products")
            )
        )
        assert exact_mismatches(conn, "user_5") == 10
    set_stage(migrated_url, "dual_write", ("user_5",))
    again = Silent()
    backfill.run(migrated_url, ["user_5"], SMALL_BATCHES, again)
    assert sum(b.products for b in again.batches) == 30
    with connect(migrated_url, autocommit=True) as conn:
        assert exact_mismatches(conn, "user_5") == 0
