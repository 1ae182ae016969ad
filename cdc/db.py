"""Connections: one alias for the psycopg connection type, one way to open one."""

from __future__ import annotations

from typing import Any, TypeAlias

import psycopg
from psycopg import sql

from cdc.errors import DatabaseUnreachableError
from cdc.server import redact

Conn: TypeAlias = psycopg.Connection[Any]
# What psycopg accepts as a composed query.
Query: TypeAlias = sql.SQL | sql.Composed


def connect(url: str, *, autocommit: bool = False, application_name: str = "imgmig") -> Conn:
    """Open a connection, turning "cannot connect" into a one-line typed error."""
    try:
        return psycopg.connect(
            url, autocommit=autocommit, application_name=application_name, connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise DatabaseUnreachableError(url=redact(url), reason=reason) from exc
