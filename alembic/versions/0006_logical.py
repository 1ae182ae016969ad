"""logical capture: projection mode 'logical' and the WAL reader's bookkeeping

Revision ID: 0006_logical
Revises: 0005_mapping_v3
Create Date: 2026-11-28

Shared, idempotent, nothing per tenant (cdc/logical.py says what the mode is):
0. ``capture_v4.sql`` (under the install lock): the projector's lag counts change events
   only, not the problem events the projector writes itself (the file says why);
1. ``imgmig.tenant_state.projection`` may also be ``'logical'``: the CHECK is replaced
   by a wider one (``imgmig.tenant_state`` is the control table, one row per tenant;
   its brief lock is taken under ``lock_timeout`` with retry like every DDL here);
2. ``imgmig.logical_checkpoint``: the slot position whose events are already logged;
3. ``imgmig.logical_seen``: a digest of each product's last logged array, per tenant.

No slot or publication is made here: they need ``wal_level = logical`` and the
REPLICATION attribute, which a migration must not require. ``imgmig project --mode
logical`` makes them.

Downgrade, per tenant: refused while the tenant captures through the slot (switch it to
deferred first). With the last tenant at this revision, the two tables go, the CHECK is
narrowed back and the SQL files up to ``mapping_v3.sql`` are run again (v1's lag).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from psycopg import sql

from cdc.capture import CURRENT_SQL, install_sql
from cdc.ddl import run_ddl
from cdc.errors import LogicalCaptureError
from cdc.migrate import current_tenant, lock_policy, others_after, raw_connection

revision: str = "0006_logical"
down_revision: str | None = "0005_mapping_v3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQL_FILES: Final = ("capture_v4.sql",)
CHECK: Final = "tenant_state_projection_check"
#: The revisions before this one: a tenant at one of them knows no 'logical' mode.
BEFORE: Final = frozenset(
    {"0001_expand", "0002_capture", "0003_capture_v2", "0004_capture_v3", "0005_mapping_v3"}
)
_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS imgmig.logical_checkpoint (
        slot text PRIMARY KEY,
        lsn pg_lsn NOT NULL,
        drained_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS imgmig.logical_seen (
        tenant text NOT NULL,
        product_id bigint NOT NULL,
        digest uuid NOT NULL,
        PRIMARY KEY (tenant, product_id)
    )""",
)


def _set_check(*, logical: bool) -> None:
    """Allow 'logical' in tenant_state.projection, or not; no DDL if already so."""
    conn = raw_connection()
    current = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'imgmig.tenant_state'::regclass AND conname = %s",
        (CHECK,),
    ).fetchone()
    if current is not None and ("'logical'" in str(current[0])) == logical:
        return
    modes = ("inline", "deferred", "logical") if logical else ("inline", "deferred")
    stmt = sql.SQL(
        "ALTER TABLE {state} DROP CONSTRAINT IF EXISTS {check}, "
        "ADD CONSTRAINT {check} CHECK (projection IN ({modes}))"
    ).format(
        state=sql.Identifier("imgmig", "tenant_state"),
        check=sql.Identifier(CHECK),
        modes=sql.SQL(", ").join(sql.Literal(m) for m in modes),
    )
    run_ddl(conn, stmt, policy=lock_policy())


def upgrade() -> None:
    conn = raw_connection()
    install_sql(conn, SQL_FILES)
    _set_check(logical=True)
    for stmt in _TABLES:
        run_ddl(conn, sql.SQL(stmt), policy=lock_policy())


def downgrade() -> None:
    tenant = current_tenant()
    conn = raw_connection()
    row = conn.execute(
        "SELECT projection FROM imgmig.tenant_state WHERE tenant = %s", (tenant,)
    ).fetchone()
    if row is not None and row[0] == "logical":
        raise LogicalCaptureError(
            tenant=tenant,
            reason="the tenant captures through the WAL; switch it first "
            "(`imgmig project --tenant T --mode deferred`), then downgrade",
        )
    others = others_after(conn, tenant, BEFORE)
    if others:
        return
    for name in ("logical_seen", "logical_checkpoint"):
        stmt = sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("imgmig", name))
        run_ddl(conn, stmt, policy=lock_policy())
    _set_check(logical=False)
    # The files before this revision's (not every later one: those belong to revisions
    # already undone).
    install_sql(conn, CURRENT_SQL[: CURRENT_SQL.index(SQL_FILES[0])])
