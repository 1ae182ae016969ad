"""mapping v3: the canonical mapping's short cut for the legacy shape (mapping_v3.sql)

Revision ID: 0005_mapping_v3
Revises: 0004_capture_v3
Create Date: 2026-11-27

Installs ``mapping_v3.sql`` (idempotent, under the install lock): ``imgmig.images_to_rows``
returns the same rows for every input and maps the legacy app's usual array without
v2's per-element pipeline (the file's header says why that is safe;
tests/test_mapping_v3.py compares it with v2 side by side). Nothing per tenant changes:
the triggers, backfill, verify and the contract's downgrade call the function by name.

Downgrade: the shared function is v2's again once no other tenant is at this revision or
later (the functions are shared by every tenant of the database).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cdc.capture import install_sql
from cdc.migrate import current_tenant, others_after, raw_connection

revision: str = "0005_mapping_v3"
down_revision: str | None = "0004_capture_v3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_FILES: Final = ("mapping_v3.sql",)
#: The revisions before this one: a tenant at one of them runs mapping v2.
BEFORE: Final = frozenset({"0001_expand", "0002_capture", "0003_capture_v2", "0004_capture_v3"})


def upgrade() -> None:
    install_sql(raw_connection(), SQL_FILES)


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    others = others_after(conn, tenant, BEFORE)
    if not others:
        install_sql(conn, ("mapping_v1.sql", "mapping_v2.sql"))
