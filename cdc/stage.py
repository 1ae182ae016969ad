"""The per-tenant stage flag, stored in ``imgmig.tenant_state`` and audited.

Stages, in lifecycle order: ``jsonb → dual_write → shadow_read → table → contracted``.
A change updates the row, writes an audit record and re-installs the tenant's triggers
for the new stage (``cdc.capture.apply_stage``), all in the caller's transaction.
"""

from __future__ import annotations

import getpass
import importlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from psycopg import sql

from cdc.db import Conn
from cdc.errors import InvalidStageError, NotMigratedError
from cdc.tenants import CONTROL_SCHEMA, sort_key

STATE = sql.Identifier(CONTROL_SCHEMA, "tenant_state")
AUDIT = sql.Identifier(CONTROL_SCHEMA, "stage_audit")


class Stage(StrEnum):
    JSONB = "jsonb"
    DUAL_WRITE = "dual_write"
    SHADOW_READ = "shadow_read"
    TABLE = "table"
    CONTRACTED = "contracted"

    @classmethod
    def parse(cls, name: str) -> Stage:
        try:
            return cls(name)
        except ValueError:
            raise InvalidStageError(stage=name) from None

    @property
    def rank(self) -> int:
        """Position in the lifecycle: jsonb is 0, contracted is 4."""
        return list(Stage).index(self)


@dataclass(frozen=True)
class TenantState:
    tenant: str
    stage: Stage
    projection: str
    stage_changed_at: datetime
    changed_by: str | None
    reason: str | None


def get(conn: Conn, tenant: str) -> TenantState:
    """The tenant's current state; raises if the expand migration has not run for it."""
    states = get_all(conn, [tenant])
    if not states:
        raise NotMigratedError(tenant=tenant)
    return states[0]


def get_all(conn: Conn, tenants: list[str] | None = None) -> list[TenantState]:
    """States of the given tenants (or all), if the control schema exists."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.tenant_state",)
    ).fetchone()
    if not exists or not exists[0]:
        return []
    query = sql.SQL(
        "SELECT tenant, stage, projection, stage_changed_at, changed_by, reason FROM {} "
        "WHERE %(all)s OR tenant = ANY(%(tenants)s)"
    ).format(STATE)
    rows = conn.execute(query, {"all": tenants is None, "tenants": tenants or []}).fetchall()
    states = [TenantState(str(r[0]), Stage(r[1]), str(r[2]), r[3], r[4], r[5]) for r in rows]
    return sorted(states, key=lambda s: sort_key(s.tenant))


def set_stage(
    conn: Conn,
    tenant: str,
    stage: Stage | str,
    *,
    reason: str,
    actor: str | None = None,
    force: bool = False,
) -> TenantState:
    """Move ``tenant`` to ``stage``, audit it, and install the stage's triggers.

    Runs in the caller's transaction; the row lock serialises concurrent changes.
    """
    target = Stage.parse(str(stage))
    actor = actor or getpass.getuser()
    row = conn.execute(
        sql.SQL("SELECT stage FROM {} WHERE tenant = %s FOR UPDATE").format(STATE), (tenant,)
    ).fetchone()
    if row is None:
        raise NotMigratedError(tenant=tenant)
    conn.execute(
        sql.SQL(
            "UPDATE {} SET stage = %s, stage_changed_at = now(), changed_by = %s, reason = %s "
            "WHERE tenant = %s"
        ).format(STATE),
        (target.value, actor, reason, tenant),
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (tenant, from_stage, to_stage, changed_by, reason, forced) "
            "VALUES (%s, %s, %s, %s, %s, %s)"
        ).format(AUDIT),
        (tenant, row[0], target.value, actor, reason, force),
    )
    _apply(conn, tenant, target)
    return get(conn, tenant)


def _apply(conn: Conn, tenant: str, stage: Stage) -> None:
    """Install the triggers the stage needs (capture lands with cdc.capture)."""
    try:
        capture = importlib.import_module("cdc.capture")
    except ModuleNotFoundError:  # capture lands with issue 3
        return
    capture.apply_stage(conn, tenant, stage.value)
