"""Crash and concurrency: SIGKILLed backfills resume exactly; live writers always win."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc import backfill, reconcile, server
from cdc.pacing import BatchSizer
from cdc.progress import Silent
from tests.backfill_helpers import (
    T,
    duplicate_orders,
    exact_mismatches,
    ident,
    last_id,
    one_tenant,
    orphan_rows,
    scalar,
)

WRITER_PRODUCTS = 3000


@pytest.fixture
def big_url(database_url: str) -> str:
    return one_tenant(database_url, 8000)


@pytest.fixture
def mid_url(database_url: str) -> str:
    return one_tenant(database_url, WRITER_PRODUCTS)


def wait_backends_gone(conn: psycopg.Connection[Any]) -> None:
    """A SIGKILLed client's backend ends once it notices; then its lock is free."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = scalar(conn, sql.SQL(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'imgmig-backfill'"
        ))  # fmt: skip
        if left == 0:
            return
        time.sleep(0.05)
    raise AssertionError("killed backfill backends never went away")


def backfill_cmd(url: str) -> list[str]:
    return [
        sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", url,
        "backfill", "--tenant", T, "--batch-size", "50", "--target-ms", "40",
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkilled_backfill_resumes_with_nothing_lost_duplicated_or_misordered(
    big_url: str,
) -> None:
    """Killed with SIGKILL at random batches three times, then resumed: the rows are exact."""
    rng = random.Random(int(os.environ.get("CRASH_SEED", "4242")))
    kills = 0
    with psycopg.connect(big_url, autocommit=True) as conn:
        for round_no in range(1, 4):
            target = rng.randint(last_id(conn) + 200, round_no * 1800)
            proc = subprocess.Popen(backfill_cmd(big_url), stderr=subprocess.DEVNULL)
            while last_id(conn) < target and proc.poll() is None:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            kills += proc.wait() == -signal.SIGKILL
            wait_backends_gone(conn)
        assert kills == 3
        assert 0 < last_id(conn) < 8000
        done = subprocess.run(backfill_cmd(big_url), capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stderr.strip().splitlines()[-1])["exit_code"] == 0
        assert exact_mismatches(conn, T) == 0
        assert duplicate_orders(conn, T) == 0
        state = conn.execute(
            "SELECT status, products_done FROM imgmig.backfill_state WHERE tenant = %s", (T,)
        ).fetchone()
        assert state == ("done", 8000)


def backfill_traces_past(conn: psycopg.Connection[Any], last: int) -> int:
    """Rows or backfill snapshot events of products after the checkpoint's ``last``."""
    query = sql.SQL(
        """SELECT (SELECT count(*) FROM {images} WHERE product_id > %(last)s)
                + (SELECT count(*) FROM {events} WHERE type = 'images.snapshot'
                      AND aggregateid::bigint > %(last)s)"""
    ).format(images=ident(T, "product_images"), events=ident(T, "image_events"))
    row = conn.execute(query, {"last": last}).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
def test_server_crash_mid_backfill_never_splits_a_batch_from_its_checkpoint() -> None:
    """Batches commit asynchronously; a crash may lose the last ones, never half of one.

    A private durable embedded server (fsync on), shut down immediately (SIGQUIT: no
    checkpoint, WAL buffers lost) while the backfill runs. After crash recovery every
    product up to the checkpoint is exact and nothing past it was projected or logged;
    the resumed run ends exact. Its own server, so it runs the same on both CI passes.
    """
    base = Path(tempfile.mkdtemp(prefix=server.TEST_DIR_PREFIX, dir="/tmp"))
    (base / "owner.pid").write_text(str(os.getpid()))
    srv, handle = server.start_embedded(base / "d")
    try:
        url = one_tenant(server.fresh_database(srv.url, "imgmig_server_crash"), 4000)
        proc = subprocess.Popen(backfill_cmd(url), stderr=subprocess.DEVNULL)
        with psycopg.connect(url, autocommit=True) as conn:
            while last_id(conn) < 1500 and proc.poll() is None:
                time.sleep(0.01)
        postmaster = handle.get_pid()
        os.kill(postmaster, signal.SIGQUIT)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{postmaster}").exists():
            time.sleep(0.05)
        handle.ensure_postgres_running()  # crash recovery replays the WAL that reached disk
        with psycopg.connect(url, autocommit=True) as conn:
            recovered = last_id(conn)
            assert 0 < recovered < 4000
            assert backfill_traces_past(conn, recovered) == 0
            assert exact_mismatches(conn, T, up_to=recovered) == 0
            done = subprocess.run(backfill_cmd(url), capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr
            assert exact_mismatches(conn, T) == 0
            assert duplicate_orders(conn, T) == 0
            assert last_id(conn) == scalar(conn, sql.SQL("SELECT max(id) FROM {}").format(
                ident(T, "products")))  # fmt: skip
    finally:
        server.stop_embedded(handle)
        shutil.rmtree(base, ignore_errors=True)


def write_forever(url: str, stop: threading.Event, seed_no: int, done: Counter[str]) -> None:
    """Edit JSONB the way the legacy app does, one product per transaction."""
    rng = random.Random(seed_no)
    products = ident(T, "products")
    ops = {
        "append": "UPDATE {p} SET images = images || jsonb_build_array(jsonb_build_object("
        "'url', 'https://cdn.example/new/' || md5(random()::text) || '.jpg', "
        "'order', jsonb_array_length(images))) WHERE id = %s",
        "remove": "UPDATE {p} SET images = images - 0 WHERE id = %s",
        # coalesce: an array emptied by "remove" aggregates to NULL, and images is NOT NULL
        "reorder": "UPDATE {p} SET images = coalesce((SELECT jsonb_agg(jsonb_set(e, "
        "'{{order}}', to_jsonb(n - i)) ORDER BY n - i) FROM jsonb_array_elements(images) "
        "WITH ORDINALITY AS x(e, i), LATERAL (SELECT jsonb_array_length(images) AS n) l), "
        "'[]') WHERE id = %s",
        "delete": "DELETE FROM {p} WHERE id = %s",
        "insert": "INSERT INTO {p} (sku, title, images) SELECT 'N-' || %s, 'new', "
        '\'[{{"url": "https://cdn.example/i/1.jpg", "order": 0}}]\'',
    }
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            op = rng.choice(list(ops))
            stmt = sql.SQL(ops[op]).format(p=products)
            conn.execute(stmt, (rng.randint(1, WRITER_PRODUCTS),))
            done[op] += 1
            time.sleep(0.002)  # an app's pace, not a tight loop that starves two cores


@pytest.mark.slow
def test_live_writers_during_the_whole_backfill_leave_no_drift(mid_url: str) -> None:
    """Writers append, remove, reorder, delete and insert throughout; verify ends clean."""
    stop = threading.Event()
    done: Counter[str] = Counter()
    writers = [
        threading.Thread(target=write_forever, args=(mid_url, stop, n, done)) for n in range(3)
    ]
    for w in writers:
        w.start()
    time.sleep(0.3)  # writes before the backfill starts, too
    # The cap keeps the run long (>= 30 batches) however fast the machine is, so the
    # writers overlap the whole backfill rather than its first few batches.
    config = backfill.BackfillConfig(batch_size=50, sizer=BatchSizer(target_s=0.03, maximum=100))
    try:
        result = backfill.run(mid_url, [T], config, Silent())[0]
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert result.status == "done"
    assert result.batches > 20
    # Every batch skipped PostgreSQL's product_id check (cdc.fkcheck) while products were
    # being deleted: the batch's own row locks must still leave no orphan row.
    assert result.fk_check_skipped == result.batches
    assert all(done[op] > 5 for op in ("append", "remove", "reorder", "delete", "insert"))
    outcome = reconcile.run(mid_url, [T], mode="verify")[0]
    assert outcome.report.drift_total == 0
    assert outcome.exit_code == 0
    with psycopg.connect(mid_url) as conn:
        assert exact_mismatches(conn, T) == 0
        assert duplicate_orders(conn, T) == 0
        assert orphan_rows(conn, T) == 0
