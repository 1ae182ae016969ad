"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from collections.abc import Sequence

from cdc.migrate import current_tenant, raw_connection

revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    ${upgrades if upgrades else "raise NotImplementedError"}


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    ${downgrades if downgrades else "raise NotImplementedError"}
