"""capture v3: the deferred-mode trigger function written per tenant (capture_v3.sql)

Revision ID: 0004_capture_v3
Revises: 0003_capture_v2
Create Date: 2026-11-27

Per tenant:
1. the shared installer ``imgmig.install_log_function`` (idempotent, under the install
   lock), then the tenant's own ``<tenant>.imgmig_log_products_row()``;
2. a tenant in deferred mode has its three log triggers pointed at that function, each
   with one ``CREATE OR REPLACE TRIGGER`` under ``lock_timeout`` with retry (the trigger
   is swapped in place: there is no instant without capture).

Downgrade, per tenant: the log triggers pointed back at v2's shared
``imgmig.log_products_row()``, the tenant's function dropped; with the last tenant at
this revision, the installer dropped too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

from cdc.capture import (
    LOG_FUNCTION,
    LOG_ONLY,
    drop_tenant_function,
    install_log_function,
    install_sql,
    repoint,
)
from cdc.migrate import current_tenant, raw_connection

revision: str = "0004_capture_v3"
down_revision: str | None = "0003_capture_v2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_FILES: Final = ("capture_v3.sql",)
# v2's trigger set: the same triggers on the shared function.
LOG_ONLY_V2: Final = tuple(
    dataclasses.replace(spec, function="log_products_row", per_tenant=False) for spec in LOG_ONLY
)


def upgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    install_sql(conn, SQL_FILES)
    install_log_function(conn, tenant)
    repoint(conn, tenant, LOG_ONLY)


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    repoint(conn, tenant, LOG_ONLY_V2)
    drop_tenant_function(conn, tenant, LOG_FUNCTION)
