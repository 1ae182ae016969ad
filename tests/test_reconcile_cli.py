"""The cron entry points as a user runs them: exit codes, JSON last line, metrics, overlap."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

from cdc import backfill, locks
from cdc.progress import Silent
from tests.backfill_helpers import ident, set_stage
from tests.test_reconcile import inject_drift

T = "user_1"


def imgmig(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def start(url: str, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", url, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_json(stderr: str) -> dict[str, object]:
    lines = [line for line in stderr.splitlines() if line.startswith("{")]
    parsed: dict[str, object] = json.loads(lines[-1])
    return parsed


def backfilled(url: str) -> None:
    set_stage(url, "dual_write", (T,))
    backfill.run(url, [T], backfill.BackfillConfig(batch_size=50), Silent())


def test_reconcile_exit_codes_json_line_and_metrics(migrated_url: str, tmp_path: Path) -> None:
    """Drift: verify exits 2, reconcile repairs and exits 1, then both exit 0; metrics written."""
    backfilled(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        inject_drift(conn)
    verify = imgmig(migrated_url, "verify", "--tenant", T)
    assert verify.returncode == 2
    assert last_json(verify.stderr)["exit_code"] == 2
    metrics = tmp_path / "imgmig.prom"
    fixed = imgmig(migrated_url, "reconcile", "--all", "--metrics-file", str(metrics))
    assert fixed.returncode == 1, fixed.stderr
    line = last_json(fixed.stderr)
    assert (line["event"], line["exit_code"], line["repaired"]) == ("reconcile finished", 1, 5)
    text = metrics.read_text()
    assert 'imgmig_drift_products{class="missing",mode="reconcile",tenant="user_1"} 1.0' in text
    assert 'imgmig_run_exit_code{mode="reconcile"} 1.0' in text
    clean = imgmig(migrated_url, "reconcile", "--all")
    assert clean.returncode == 0
    assert last_json(clean.stderr)["exit_code"] == 0


def test_overlapping_reconcile_runs_are_refused(migrated_url: str) -> None:
    """While a first run holds the tenant, a second exits at once with 75 and says why."""
    backfilled(migrated_url)
    with (
        psycopg.connect(migrated_url) as blocker,
        psycopg.connect(migrated_url, autocommit=True) as watcher,
    ):
        # Hold the first run inside its verify, after it took the tenant lock.
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            ident(T, "product_images")))  # fmt: skip
        first = start(migrated_url, "reconcile", "--tenant", T)
        deadline = time.monotonic() + 30
        # A second connection: pg_stat_activity is a snapshot per transaction.
        held = None
        while time.monotonic() < deadline:
            held = watcher.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND a.application_name = 'imgmig-reconcile'"
            ).fetchone()
            if held and held[0]:
                break
            time.sleep(0.05)
        assert held is not None
        assert held[0], "the first run never took the tenant lock"
        second = imgmig(migrated_url, "reconcile", "--tenant", T)
        blocker.rollback()
    assert second.returncode == 75
    assert "busy with another imgmig run" in second.stderr
    assert "imgmig-reconcile" in second.stderr
    assert last_json(second.stderr)["exit_code"] == 75
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


def test_a_run_over_every_tenant_skips_a_busy_one_and_does_the_rest(migrated_url: str) -> None:
    """A long backfill of one tenant must not stop the cron's reconcile of the others: the
    busy tenant is skipped (75, try again later), every other one is reconciled."""
    set_stage(migrated_url, "dual_write", ("user_1", "user_2"))
    config = backfill.BackfillConfig(batch_size=50)
    assert {
        r.status for r in backfill.run(migrated_url, ["user_1", "user_2"], config, Silent())
    } == {"done"}
    with psycopg.connect(migrated_url, autocommit=True) as holder:
        assert locks.try_lock(holder, "user_2")  # as a backfill of user_2 would
        done = imgmig(migrated_url, "reconcile", "--all")
        runs = holder.execute(
            "SELECT tenant FROM imgmig.verify_runs WHERE mode = 'reconcile' ORDER BY tenant"
        ).fetchall()
    assert done.returncode == 75, done.stderr
    assert "tenant skipped: another imgmig run holds it" in done.stderr
    assert last_json(done.stderr)["exit_code"] == 75
    assert runs == [("user_1",)], "the free tenant was reconciled, the busy one not"


def test_bad_input_gives_one_line_and_exit_4(migrated_url: str) -> None:
    """An unknown tenant, an unknown label strategy, or --tenant with --all: exit 4."""
    unknown = imgmig(migrated_url, "reconcile", "--tenant", "user_99")
    assert unknown.returncode == 4
    assert "unknown tenant 'user_99'" in unknown.stderr
    both = imgmig(migrated_url, "verify", "--all", "--tenant", T)
    assert both.returncode == 4
    assert "exclude each other" in both.stderr
    strategy = imgmig(migrated_url, "backfill", "--all", "--label-strategy", "magic")
    assert strategy.returncode == 4
    assert "unknown label strategy 'magic'" in strategy.stderr


def test_backfill_cli_pause_resume_and_run(migrated_url: str) -> None:
    """pause and resume flip the switch; backfill --tenant runs to done with exit 0."""
    assert imgmig(migrated_url, "backfill", "pause").returncode == 0
    with psycopg.connect(migrated_url) as conn:
        row = conn.execute("SELECT value FROM imgmig.switches WHERE name = 'backfill_paused'")
        assert row.fetchone() == (True,)
    assert imgmig(migrated_url, "backfill", "resume").returncode == 0
    set_stage(migrated_url, "dual_write", (T,))
    run = imgmig(migrated_url, "backfill", "--tenant", T, "--batch-size", "25")
    assert run.returncode == 0, run.stderr
    assert last_json(run.stderr)["exit_code"] == 0
    status = imgmig(migrated_url, "backfill", "status")
    assert status.returncode == 0
    assert "user_1" in status.stdout
    assert "done" in status.stdout
    refused = imgmig(migrated_url, "backfill", "--tenant", "user_2")
    assert refused.returncode == 7
    assert "no change capture yet" in refused.stderr


def test_a_failing_run_exits_3_with_its_json_line(migrated_url: str) -> None:
    """A database error mid-run is exit 3, one error line, and exit_code 3 in the log."""
    backfilled(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute("DROP FUNCTION imgmig.images_problems(jsonb) CASCADE")
    failed = imgmig(migrated_url, "verify", "--tenant", T)
    assert failed.returncode == 3
    last = last_json(failed.stderr)
    assert (last["exit_code"], last["level"]) == (3, "error")
    assert "images_problems" in failed.stderr  # the tenant's own error line names it
    assert "Traceback" not in failed.stderr
