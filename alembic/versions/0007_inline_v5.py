"""capture v5: the inline-mode trigger, row-level and written per tenant (capture_v5.sql)

Revision ID: 0007_inline_v5
Revises: 0006_logical
Create Date: 2026-11-28

Per tenant:
1. the shared installer ``imgmig.install_capture_function`` (idempotent, under the
   install lock), then the tenant's own ``<tenant>.imgmig_capture_products_row()``;
2. a tenant in inline mode has its three capture triggers replaced in place, from v2's
   statement-level triggers on ``imgmig.capture_products()`` to row-level ones on that
   function, each with one ``CREATE OR REPLACE TRIGGER`` under ``lock_timeout`` with retry:
   there is no instant without capture.

Downgrade, per tenant: the capture triggers replaced back by v2's statement-level ones,
the tenant's function dropped; with the last tenant at this revision, the installer too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cdc.capture import (
    CAPTURE,
    CAPTURE_FUNCTION,
    CAPTURE_V2,
    drop_tenant_function,
    install_capture_function,
    install_sql,
    repoint,
)
from cdc.migrate import current_tenant, raw_connection

revision: str = "0007_inline_v5"
down_revision: str | None = "0006_logical"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_FILES: Final = ("capture_v5.sql",)


def upgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    install_sql(conn, SQL_FILES)
    install_capture_function(conn, tenant)
    repoint(conn, tenant, CAPTURE)


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    repoint(conn, tenant, CAPTURE_V2)
    drop_tenant_function(conn, tenant, CAPTURE_FUNCTION)
