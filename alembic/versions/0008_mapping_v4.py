"""mapping v4: the general pipeline in its own function, every day of the month short-cut

Revision ID: 0008_mapping_v4
Revises: 0007_inline_v5
Create Date: 2026-11-28

Installs ``mapping_v4.sql`` (idempotent, under the install lock): ``imgmig.images_to_rows``
returns the same rows for every input; its general pipeline moves into
``imgmig.images_to_rows_general``, so a call for an array of the legacy shape no longer
starts the executor for it (the file's header has the measurements), and the short cut
admits days 29-31 where the month has them. tests/test_mapping_v3.py compares the
installed mapping with v2 side by side. Nothing per tenant changes.

Downgrade: the shared function is v3's again, and the general function is dropped, once
no other tenant is at this revision or later (the functions are shared by every tenant
of the database).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from psycopg import sql

from cdc.capture import install_sql
from cdc.ddl import run_ddl
from cdc.migrate import current_tenant, others_after, raw_connection

revision: str = "0008_mapping_v4"
down_revision: str | None = "0007_inline_v5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_FILES: Final = ("mapping_v4.sql",)
GENERAL: Final = sql.Identifier("imgmig", "images_to_rows_general")
#: The revisions before this one: a tenant at one of them runs mapping v3 (or older).
BEFORE: Final = frozenset(
    {
        "0001_expand",
        "0002_capture",
        "0003_capture_v2",
        "0004_capture_v3",
        "0005_mapping_v3",
        "0006_logical",
        "0007_inline_v5",
    }
)


def upgrade() -> None:
    install_sql(raw_connection(), SQL_FILES)


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    others = others_after(conn, tenant, BEFORE)
    if not others:
        install_sql(conn, ("mapping_v3.sql",))  # v3's images_to_rows no longer calls it
        run_ddl(conn, sql.SQL("DROP FUNCTION IF EXISTS {}(jsonb)").format(GENERAL))
