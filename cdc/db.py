"""Connections: one alias for the psycopg connection type, one way to open one."""

from __future__ import annotations

from typing import Any, TypeAlias

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cdc.errors import DatabaseUnreachableError
from cdc.server import redact

Conn: TypeAlias = psycopg.Connection[Any]
# What psycopg accepts as a composed query.
Query: TypeAlias = sql.SQL | sql.Composed


def connect(
    url: str, *, autocommit: bool = False, application_name: str = "imgmig", batch: bool = False
) -> Conn:
    """Open a connection, turning "cannot connect" into a one-line typed error.

    ``batch``: for the backfill and reconcile workers, whose set-based statements over
    thousands of products are costed high enough for PostgreSQL to JIT-compile them;
    compiling took longer than running them (BENCHMARKS.md), so JIT is off there.
    """
    params: dict[str, Any] = {"application_name": application_name, "connect_timeout": 10}
    if batch:  # appended to any options the URL already carries
        given = str(conninfo_to_dict(url).get("options", ""))
        params["options"] = f"{given} -c jit=off".strip()
    try:
        return psycopg.connect(url, autocommit=autocommit, **params)
    except psycopg.OperationalError as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise DatabaseUnreachableError(url=redact(url), reason=reason) from exc
