"""capture v2: a cheaper write path (mapping_v2.sql, capture_v2.sql), a BRIN event-log index

Revision ID: 0003_capture_v2
Revises: 0002_capture
Create Date: 2026-11-22

Per tenant:
1. the shared functions of ``mapping_v2.sql`` and ``capture_v2.sql`` (idempotent, under
   the install lock; they replace some of v1's, same events, rows and hashes, see the
   files' headers);
2. ``image_events (txid)`` indexed with BRIN instead of a B-tree: the log is append-only
   and txid grows with the insertion order, so a BRIN range summary serves the
   projector's ``txid >= horizon`` scan, and an insert no longer pays a B-tree descent.
   Built ``CONCURRENTLY`` (the log may be large), then the B-tree dropped ``CONCURRENTLY``.

Downgrade, per tenant: the B-tree back (concurrently), the BRIN dropped; with the last
tenant at this revision (the last BRIN index), the shared functions go back to v1's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from psycopg import sql

from alembic import op
from cdc.capture import install_sql
from cdc.db import Conn
from cdc.ddl import build_index_concurrently, run_concurrently
from cdc.migrate import current_tenant, lock_policy, raw_connection

revision: str = "0003_capture_v2"
down_revision: str | None = "0002_capture"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_FILES: Final = ("mapping_v2.sql", "capture_v2.sql")
BRIN: Final = "image_events_txid_brin"
BTREE: Final = "image_events_txid_idx"
# Functions capture_v2.sql adds (the others it replaces go back to v1's bodies).
ADDED_FUNCTIONS: Final = (
    "images_clean(jsonb)",
    "record_malformed(text, bigint)",
    "snapshot_batch(text, bigint[], text, boolean)",
)


def upgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    install_sql(conn, SQL_FILES)
    with op.get_context().autocommit_block():
        _build(conn, tenant, BRIN, "brin")
        _drop(conn, tenant, BTREE)


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    with op.get_context().autocommit_block():
        _build(conn, tenant, BTREE, "btree")
        _drop(conn, tenant, BRIN)
    if not _brin_left(conn):
        install_sql(conn, ("mapping_v1.sql", "capture_v1.sql"))
        for signature in ADDED_FUNCTIONS:
            conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}.{}").format(
                    sql.Identifier("imgmig"), sql.SQL(signature)
                )
            )


def _build(conn: Conn, tenant: str, name: str, method: str) -> None:
    create = sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING {} (txid)").format(
        sql.Identifier(name), sql.Identifier(tenant, "image_events"), sql.Identifier(method)
    )
    build_index_concurrently(conn, tenant, name, create, policy=lock_policy())


def _drop(conn: Conn, tenant: str, name: str) -> None:
    drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(tenant, name))
    run_concurrently(conn, drop, schema=tenant, policy=lock_policy())


def _brin_left(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_class WHERE relname = %s AND relkind = 'i'", (BRIN,)
    ).fetchone()
    return row is not None and int(row[0]) > 0
