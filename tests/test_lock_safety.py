"""DDL never waits long for a lock: bounded retries, a clear failure, traffic keeps flowing."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from cdc import migrate
from cdc.ddl import LockPolicy, run_ddl
from cdc.errors import LockTimeoutExceededError

FAST = LockPolicy(lock_timeout_ms=100, attempts=3, base_backoff_s=0.05, max_backoff_s=0.1)


class Traffic(threading.Thread):
    """Reads and writes other products of the tenant until stopped; records failures."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.reads = 0
        self.writes = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("SET statement_timeout = '10s'")
                while not self.stop.is_set():
                    conn.execute("SELECT count(*) FROM user_1.products WHERE id > 10").fetchone()
                    self.reads += 1
                    conn.execute(
                        "UPDATE user_1.products SET title = title || '' WHERE id = %s",
                        (20 + self.writes % 50,),
                    )
                    self.writes += 1
        except BaseException as exc:  # recorded and asserted on
            self.errors.append(exc)


def test_held_lock_makes_expand_retry_then_fail_cleanly(seeded_url: str) -> None:
    """A held ROW EXCLUSIVE lock on products: the FK step retries, gives up naming the blocker,
    leaves the tenant unmigrated, and other reads and writes keep working meanwhile."""
    blocker = psycopg.connect(seeded_url)
    blocker.execute("UPDATE user_1.products SET title = title WHERE id = 1")  # open transaction
    blocker_pid = blocker.info.backend_pid
    traffic = Traffic(seeded_url)
    traffic.start()
    try:
        with (
            capture_logs() as logs,
            pytest.raises(LockTimeoutExceededError) as failure,
        ):
            migrate.upgrade(seeded_url, tenants=["user_1"], policy=FAST)
        writes_during_migration = traffic.writes
    finally:
        traffic.stop.set()
        traffic.join(timeout=30)
        blocker.rollback()
        blocker.close()

    err = failure.value
    assert err.attempts == FAST.attempts
    assert any(b.pid == blocker_pid and b.relation == "user_1.products" for b in err.blockers)
    assert f"pid {blocker_pid}" in str(err)
    retries = [e for e in logs if e["event"] == "ddl lock timeout; retrying"]
    assert len(retries) == FAST.attempts - 1
    assert not traffic.errors
    assert writes_during_migration > 0
    assert traffic.reads > 0
    with psycopg.connect(seeded_url) as conn:
        version = conn.execute("SELECT to_regclass('user_1.alembic_version')").fetchone()
        fk = conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'product_images_product_id_fkey'"
        ).fetchone()
    assert version == (None,), "the failed tenant must not be stamped"
    assert fk == (0,)
    # Once the blocker is gone the same command succeeds.
    migrate.upgrade(seeded_url, tenants=["user_1"], policy=FAST)


def test_retry_succeeds_when_the_blocker_lets_go(database_url: str) -> None:
    """A lock released between attempts costs a retry, not a failure."""
    with psycopg.connect(database_url, autocommit=True) as setup:
        setup.execute("CREATE TABLE t (id int)")
    holder = psycopg.connect(database_url)
    holder.execute("LOCK TABLE t IN ACCESS SHARE MODE")
    releaser = threading.Timer(0.15, holder.rollback)
    releaser.start()
    policy = LockPolicy(lock_timeout_ms=100, attempts=10, base_backoff_s=0.05, max_backoff_s=0.1)
    started = time.monotonic()
    try:
        with psycopg.connect(database_url) as conn:
            run_ddl(conn, sql.SQL("ALTER TABLE t ADD COLUMN v int"), policy=policy)
            conn.commit()
            cols = conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 't'"
            ).fetchall()
    finally:
        releaser.join()
        holder.close()
    assert cols == [("id",), ("v",)]
    assert time.monotonic() >= started


def test_lock_timeout_is_set_only_for_the_statement(database_url: str) -> None:
    """run_ddl scopes lock_timeout to its savepoint: the session setting is untouched after."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SET lock_timeout = '7s'")
        run_ddl(conn, sql.SQL("CREATE TABLE u (id int)"), policy=FAST)
        row = conn.execute("SHOW lock_timeout").fetchone()
    assert row == ("7s",)
