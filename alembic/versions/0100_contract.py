"""contract: archive and drop products.images; the downgrade restores it from product_images

Revision ID: contract
Revises: expand
Create Date: 2026-11-22

Per tenant (env.py runs it once per tenant schema, one transaction each). The guards, the
archive and the restore live in ``cdc.contract`` and are documented there. Options:

* ``-x contract_min_table_age=SECONDS``: how long a tenant must have been at ``table``
  (default 3600);
* ``-x restore_batch_size=N``: products per batch when the downgrade rebuilds JSONB;
* ``-x lock_timeout_ms`` / ``-x ddl_attempts``: the DDL lock policy.

The SQL frozen with this revision is the canonical mapping ``mapping_v1``/``capture_v1``,
which is what ``imgmig.rows_images`` refers to.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from alembic import op
from cdc.contract import ContractOptions, contract_tenant, restore_tenant
from cdc.migrate import current_tenant, lock_policy, raw_connection, x_option

revision: str = "contract"
down_revision: str | None = "expand"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _options() -> ContractOptions:
    return ContractOptions(
        min_table_age=timedelta(seconds=float(x_option("contract_min_table_age", "3600"))),
        batch_size=int(x_option("restore_batch_size", "500")),
        policy=lock_policy(),
    )


def upgrade() -> None:
    contract_tenant(raw_connection(), current_tenant(), _options())


def downgrade() -> None:
    # Batches commit one by one, so the rebuild runs outside the tenant transaction.
    conn = raw_connection()
    tenant = current_tenant()
    with op.get_context().autocommit_block():
        restore_tenant(conn, tenant, _options())
