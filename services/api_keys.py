"""API keys: one tenant per key, stored as a SHA-256 hash, never in clear.

The table ``imgmig.api_keys`` is created idempotently by :func:`ensure_table` (from
``imgmig api-key create`` and the app factory) rather than by an Alembic revision, so it
does not take a place in the per-tenant migration chain: it is control data, not schema
of a tenant. A key is 32 random bytes (``secrets.token_urlsafe``); it is shown once.
"""

from __future__ import annotations

import hashlib
import secrets

from psycopg import sql

from cdc.db import Conn
from cdc.tenants import CONTROL_SCHEMA, validate_name

TABLE = sql.Identifier(CONTROL_SCHEMA, "api_keys")

_DDL = (
    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(CONTROL_SCHEMA)),
    sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (key_hash text PRIMARY KEY, tenant text NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now(), created_by text)"
    ).format(TABLE),
)


def hash_key(key: str) -> str:
    """The stored form of a key: hex SHA-256 (keys are random, so no salt is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_table(conn: Conn) -> None:
    """Create ``imgmig.api_keys`` if it is missing, serialised by an advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('imgmig.api_keys'))")
        for stmt in _DDL:
            conn.execute(stmt)


def create_key(conn: Conn, tenant: str, *, actor: str | None = None) -> str:
    """Create a key for ``tenant`` and return it; only its hash is stored."""
    ensure_table(conn)
    key = secrets.token_urlsafe(32)
    with conn.transaction():
        conn.execute(
            sql.SQL("INSERT INTO {} (key_hash, tenant, created_by) VALUES (%s, %s, %s)").format(
                TABLE
            ),
            (hash_key(key), validate_name(tenant), actor),
        )
    return key
