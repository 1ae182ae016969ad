"""expand: the end of the expand phase, a name to upgrade to

Revision ID: expand
Revises: 0008_mapping_v4
Create Date: 2026-11-22

``alembic upgrade expand`` runs every additive revision (table, indexes, control schema,
capture functions and event log) and stops short of ``contract``, which drops a column
and refuses until a tenant is ready. New additive revisions go *before* this marker.
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "expand"
down_revision: str | None = "0008_mapping_v4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing to do: this revision only names the end of the expand phase."""


def downgrade() -> None:
    """Nothing to undo."""
