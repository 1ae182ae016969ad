"""Connections: one alias for the psycopg connection type, one way to open one."""

from __future__ import annotations

from typing import Any, TypeAlias

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cdc.errors import DatabaseUnreachableError
from cdc.server import redact

Conn: TypeAlias = psycopg.Connection[Any]

log = structlog.get_logger(__name__)

#: ``backend_flush_after`` for batch connections: how much a backfill or reconcile
#: backend writes out of shared buffers before it asks the kernel to start writeback
#: (PostgreSQL's default is 0: the kernel gathers dirty pages and flushes them in bursts
#: that stall other sessions' WAL fsyncs). Measured on the backfill benchmark: the
#: writers' p99 during backfill 2.14x-2.48x of idle with it, 2.62x and 4.01x without,
#: throughput unchanged (BENCHMARKS.md).
BATCH_FLUSH_AFTER = "256kB"

# What psycopg accepts as a composed query.
Query: TypeAlias = sql.SQL | sql.Composed


def connect(
    url: str, *, autocommit: bool = False, application_name: str = "imgmig", batch: bool = False
) -> Conn:
    """Open a connection, turning "cannot connect" into a one-line typed error.

    ``batch``: for the backfill and reconcile workers, whose set-based statements over
    thousands of products are costed high enough for PostgreSQL to JIT-compile them;
    compiling took longer than running them (BENCHMARKS.md), so JIT is off there; and
    they write out their dirty buffers as they go (``BATCH_FLUSH_AFTER``).
    """
    params: dict[str, Any] = {"application_name": application_name, "connect_timeout": 10}
    if batch:  # appended to any options the URL already carries
        given = str(conninfo_to_dict(url).get("options", ""))
        params["options"] = f"{given} -c jit=off".strip()
    try:
        conn = psycopg.connect(url, autocommit=autocommit, **params)
    except psycopg.OperationalError as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise DatabaseUnreachableError(url=redact(url), reason=reason) from exc
    if batch:
        _smooth_writeback(conn)
    return conn


def _smooth_writeback(conn: Conn) -> None:
    """Set ``backend_flush_after`` for the session; a server that refuses keeps its own.

    Not in the startup options with ``jit``: a refused option there would refuse the
    connection, and this one only buys latency for others.
    """
    try:
        with conn.transaction():
            conn.execute(
                "SELECT set_config('backend_flush_after', %s, false)", (BATCH_FLUSH_AFTER,)
            )
    except psycopg.Error as exc:
        log.warning("backend_flush_after not set", error=str(exc).strip() or type(exc).__name__)
