"""Lock-safe DDL: every statement under ``lock_timeout``, with a bounded, jittered retry.

A DDL statement that waits for a lock also blocks everything queued behind it, so a
migration must never wait long. Each attempt runs in a savepoint with ``SET LOCAL
lock_timeout``; on ``LockNotAvailable`` the savepoint is rolled back, we sleep with
jitter and try again. After the last attempt we name the backends holding locks in the
way, so the operator knows whom to talk to.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import structlog
from psycopg import errors, sql

from cdc.db import Conn, Query
from cdc.errors import Blocker, LockTimeoutExceededError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class LockPolicy:
    """How long one attempt may wait for a lock, and how often to try."""

    lock_timeout_ms: int = 500
    attempts: int = 5
    base_backoff_s: float = 0.2
    max_backoff_s: float = 3.0

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff (AWS architecture blog's recommendation)."""
        cap = min(self.max_backoff_s, self.base_backoff_s * 2**attempt)
        return random.uniform(0, cap)


DEFAULT_POLICY = LockPolicy()


@dataclass
class LockWaits:
    """The longest time a DDL statement of this process took to get its lock and run,
    retries included: what the demo reports as "longest lock wait"."""

    longest_s: float = 0.0
    statement: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, seconds: float, statement: str) -> None:
        with self._lock:
            if seconds > self.longest_s:
                self.longest_s, self.statement = seconds, statement


LOCK_WAITS = LockWaits()


def run_ddl(
    conn: Conn,
    stmt: Query,
    *,
    policy: LockPolicy = DEFAULT_POLICY,
    schema: str | None = None,
) -> None:
    """Run one DDL statement under ``lock_timeout``, retrying on lock timeouts.

    Works inside a transaction (each attempt is a savepoint) and in autocommit mode
    (each attempt is its own transaction). ``schema`` narrows the blocker report.
    """
    previous = conn.execute("SELECT current_setting('lock_timeout')").fetchone()
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)", (f"{policy.lock_timeout_ms}ms",)
                )
                conn.execute(stmt)
                # SET LOCAL outlives a released savepoint: put the caller's value back.
                conn.execute("SELECT set_config('lock_timeout', %s, true)", previous)
            LOCK_WAITS.record(time.monotonic() - started, stmt.as_string(conn)[:120])
            return
        except errors.LockNotAvailable as exc:
            _retry_or_give_up(conn, stmt, exc, attempt=attempt, policy=policy, schema=schema)


def run_concurrently(
    conn: Conn,
    stmt: Query,
    *,
    policy: LockPolicy = DEFAULT_POLICY,
    schema: str | None = None,
) -> None:
    """Run a statement that cannot run in a transaction block (CREATE INDEX CONCURRENTLY).

    The connection must be in autocommit mode. ``lock_timeout`` is set per session for
    the statement and reset afterwards.
    """
    if not conn.autocommit:
        raise ValueError("run_concurrently needs an autocommit connection")
    conn.execute(
        sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{policy.lock_timeout_ms}ms"))
    )
    try:
        for attempt in range(1, policy.attempts + 1):
            try:
                conn.execute(stmt)
                return
            except errors.LockNotAvailable as exc:
                _retry_or_give_up(conn, stmt, exc, attempt=attempt, policy=policy, schema=schema)
    finally:
        conn.execute("RESET lock_timeout")


def _retry_or_give_up(
    conn: Conn,
    stmt: Query,
    exc: errors.LockNotAvailable,
    *,
    attempt: int,
    policy: LockPolicy,
    schema: str | None,
) -> None:
    """After a lock timeout: raise naming the blockers if that was the last attempt;
    otherwise cancel an autovacuum in the way, then sleep with jitter."""
    if attempt == policy.attempts:
        raise LockTimeoutExceededError(
            statement=stmt.as_string(conn),
            attempts=attempt,
            lock_timeout_ms=policy.lock_timeout_ms,
            blockers=find_blockers(conn, schema),
        ) from exc
    _cancel_autovacuum(conn, schema)
    pause = policy.backoff(attempt)
    log.warning(
        "ddl lock timeout; retrying",
        attempt=attempt,
        of=policy.attempts,
        sleep_s=round(pause, 3),
        statement=stmt.as_string(conn)[:120],
    )
    time.sleep(pause)


_BLOCKERS = sql.SQL(
    """
    SELECT l.pid, l.mode, format('%I.%I', n.nspname, c.relname),
           coalesce(a.state, ''), coalesce(a.query, '')
      FROM pg_locks l
      JOIN pg_class c ON c.oid = l.relation
      JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.granted AND l.pid <> pg_backend_pid()
       AND l.locktype = 'relation'
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND ({schema}::text IS NULL OR n.nspname = {schema})
       AND n.nspname NOT IN ('pg_catalog', 'information_schema')
     ORDER BY l.pid, c.relname
    """
)


def find_blockers(
    conn: Conn,
    schema: str | None,
) -> list[Blocker]:
    """Granted relation locks held by other backends (in ``schema`` if given)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_BLOCKERS.format(schema=sql.Literal(schema)))
        return [
            Blocker(
                pid=int(r[0]), mode=str(r[1]), relation=str(r[2]), state=str(r[3]), query=str(r[4])
            )
            for r in cur.fetchall()
        ]


_AUTOVACUUM = sql.SQL(
    """
    SELECT a.pid, pg_cancel_backend(a.pid)
      FROM pg_stat_activity a
     WHERE a.backend_type = 'autovacuum worker'
       AND a.datname = current_database()
       AND a.query NOT LIKE '%%to prevent wraparound%%'
       AND EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE l.pid = a.pid AND l.granted
                      AND ({schema}::text IS NULL OR n.nspname = {schema}))
    """
)


def _cancel_autovacuum(conn: Conn, schema: str | None) -> None:
    """Cancel an autovacuum worker in our way, as PostgreSQL itself would after
    ``deadlock_timeout`` (1 s), which a 500 ms ``lock_timeout`` never reaches.
    Anti-wraparound vacuums are left alone."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_AUTOVACUUM.format(schema=sql.Literal(schema)))
        for pid, _ in cur.fetchall():
            log.warning("cancelled an autovacuum worker blocking DDL", pid=pid)


def build_index_concurrently(
    conn: Conn,
    schema: str,
    name: str,
    create: sql.Composed,
    *,
    policy: LockPolicy = DEFAULT_POLICY,
) -> None:
    """Build index ``schema.name`` with ``create`` (a CREATE INDEX CONCURRENTLY IF NOT
    EXISTS statement), unless a valid one exists. An invalid one, left behind by an
    interrupted build, is dropped first: IF NOT EXISTS alone would keep it forever.
    Autocommit connection (``run_concurrently``)."""
    state = conn.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = x.relnamespace WHERE n.nspname = %s AND x.relname = %s",
        (schema, name),
    ).fetchone()
    if state is not None and state[0]:
        return
    if state is not None:
        drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, name))
        run_concurrently(conn, drop, schema=schema, policy=policy)
    run_concurrently(conn, create, schema=schema, policy=policy)
