"""Reader heartbeats: which stage this instance serves each tenant from.

When a service transaction reads a tenant's stage, the instance upserts
``imgmig.reader_heartbeats (instance, tenant, stage, seen_at)``: at once when the stage
differs from the last beat, else at most every ``interval`` seconds. The contract
(``cdc.contract``) refuses to drop the JSONB column while a fresh heartbeat still reads
it. The heartbeat has its own autocommit connection, never the caller's transaction: a
row lock held until a caller commits could form a deadlock with product locks, and a
second pooled connection per request could starve the pool.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import psycopg
import structlog

from cdc.stage import Stage

log = structlog.get_logger(__name__)

_UPSERT = (
    "INSERT INTO imgmig.reader_heartbeats AS h (instance, tenant, stage, seen_at) "
    "VALUES (%s, %s, %s, now()) ON CONFLICT (instance, tenant) "
    "DO UPDATE SET stage = excluded.stage, seen_at = excluded.seen_at"
)


def default_instance() -> str:
    """host:pid, unique per running process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """One lazily opened connection, shared by the threads of one instance."""

    def __init__(
        self,
        database_url: str,
        *,
        instance: str | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database_url = database_url
        self.instance = instance or default_instance()
        self.interval = interval
        self._clock = clock
        self._last: dict[str, tuple[float, Stage]] = {}
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def beat(self, tenant: str, stage: Stage) -> None:
        """Record that this instance now serves ``tenant`` from ``stage``; never raises
        (a missed beat only makes the contract wait for the next one)."""
        with self._lock:
            now, last = self._clock(), self._last.get(tenant)
            if last is not None and last[1] is stage and now - last[0] < self.interval:
                return
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.database_url, autocommit=True)
                self._conn.execute(_UPSERT, (self.instance, tenant, stage.value))
                self._last[tenant] = (now, stage)
            except psycopg.Error as exc:
                log.warning("heartbeat failed", tenant=tenant, error=str(exc).strip())
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
