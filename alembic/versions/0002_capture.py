"""capture: the canonical mapping, the capture machinery, and each tenant's event log

Revision ID: 0002_capture
Revises: 0001_expand
Create Date: 2026-11-22

Per tenant:
1. the shared functions in ``imgmig`` from the *versioned* files ``mapping_v1.sql`` and
   ``capture_v1.sql`` (idempotent, under an advisory lock; frozen: a later revision ships
   ``*_v2.sql`` and never edits these);
2. the tenant's append-only ``image_events`` table (new, so no lock on live tables).
No trigger is created here: triggers follow the stage (``cdc.capture.apply_stage``), and
a freshly migrated tenant is at stage ``jsonb``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from psycopg import sql

from cdc.capture import ALL_TRIGGERS, install_event_log, install_sql
from cdc.db import Conn
from cdc.ddl import run_ddl
from cdc.errors import StageRefusedError
from cdc.migrate import current_tenant, raw_connection

revision: str = "0002_capture"
down_revision: str | None = "0001_expand"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_FILES: Final = ("mapping_v1.sql", "capture_v1.sql")

# What capture_v1.sql and mapping_v1.sql create in imgmig, dropped with the last tenant.
SHARED_FUNCTIONS: Final = (
    "snapshot(text, bigint[], text)",
    "replay(text)",
    "projection_lag(text)",
    "project_pending(text)",
    "project_latest(text, bigint)",
    "reverse_images()",
    "log_products_row()",
    "capture_products()",
    "rows_hash(text, bigint)",
    "rows_images(text, bigint[])",
    "project(text, bigint[], jsonb[])",
    "change_events(text, jsonb, jsonb, text)",
    "current_source()",
    "install_event_log(text)",
    "reject_event_change()",
    "images_problems(jsonb)",
    "images_hash(jsonb)",
    "images_canonical(jsonb)",
    "images_to_rows(jsonb)",
    "row_to_element(text, integer, boolean, text, text[], text, bigint, integer, integer, "
    "timestamptz, jsonb)",
    "format_created_at(timestamptz)",
    "parse_created_at(jsonb)",
)


def upgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    install_sql(conn, SQL_FILES)
    install_event_log(conn, tenant)


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    _refuse_unless_jsonb(conn, tenant)
    for spec in ALL_TRIGGERS:
        run_ddl(conn, spec.drop(tenant), schema=tenant)
    drop = sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(tenant, "image_events"))
    run_ddl(conn, drop, schema=tenant)
    conn.execute("DELETE FROM imgmig.projector_checkpoint WHERE tenant = %s", (tenant,))
    if not _event_logs_left(conn):
        for signature in SHARED_FUNCTIONS:
            stmt = sql.SQL("DROP FUNCTION IF EXISTS {}.{}").format(
                sql.Identifier("imgmig"),
                sql.SQL(signature),
            )
            conn.execute(stmt)
        conn.execute("DROP TYPE IF EXISTS imgmig.image_change")
        conn.execute("DROP TABLE IF EXISTS imgmig.projector_checkpoint")


def _refuse_unless_jsonb(conn: Conn, tenant: str) -> None:
    """Capture can only go while no trigger needs it: the tenant must be at stage jsonb."""
    row = conn.execute(
        "SELECT stage FROM imgmig.tenant_state WHERE tenant = %s", (tenant,)
    ).fetchone()
    if row is not None and row[0] != "jsonb":
        raise StageRefusedError(
            tenant=tenant,
            stage=str(row[0]),
            action="remove change capture",
            why="triggers of this stage need it; move the stage back to jsonb first",
        )


def _event_logs_left(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'image_events' AND c.relkind = 'r'"
    ).fetchone()
    return row is not None and int(row[0]) > 0
