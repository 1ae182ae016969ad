"""Guarded stage changes and the kill switch.

``cdc.stage.set_stage`` moves a tenant and audits it; this module decides whether it may:

* one step forward at a time (``jsonb → dual_write → shadow_read → table → contracted``);
  a skip is refused without ``force``;
* ``shadow_read`` needs ``imgmig.backfill_state.status = 'done'`` and a clean latest verify;
* ``table`` needs a clean latest verify and a shadow period (``imgmig.shadow_stats``, reset
  when the tenant enters ``shadow_read``) with reads and zero mismatches;
* ``contracted`` needs a clean latest verify and the JSONB column gone: the contract
  migration (``cdc.contract``) archives and drops it and sets the stage itself;
* going back to ``dual_write``, ``shadow_read`` or ``table`` is always allowed: JSONB holds
  every image in those stages (capture, or the reverse trigger in ``table``);
* going back to ``jsonb`` needs ``force``: the table stops following JSONB, so the
  backfill and verify have to run again before the next step forward;
* leaving ``contracted`` is refused while the JSONB column is gone (the restoring Alembic
  downgrade brings it back), and needs ``force`` once it is there again.

``force`` overrides a guard, never a missing column, and is audited (``forced = true``,
with the overridden guards appended to the reason).
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass

import structlog
from psycopg import sql

from cdc import checkpoint, migrate
from cdc import stage as stage_mod
from cdc.db import Conn
from cdc.errors import GuardRefusedError, ImgmigError, ReasonRequiredError, StageRefusedError
from cdc.stage import Stage
from cdc.tenants import CONTROL_SCHEMA

log = structlog.get_logger(__name__)

#: Where the kill switch sends each stage: the safest stage that still has all the data.
KILL_TARGET: dict[Stage, Stage] = {
    Stage.TABLE: Stage.DUAL_WRITE,
    Stage.SHADOW_READ: Stage.DUAL_WRITE,
}


@dataclass(frozen=True)
class Transition:
    """One audited stage change (or, for the kill switch, a tenant left where it was)."""

    tenant: str
    from_stage: Stage
    to_stage: Stage
    forced: bool = False
    overridden: tuple[str, ...] = ()
    note: str = ""
    error: str | None = None


def _one(conn: Conn, query: sql.Composed, params: tuple[object, ...]) -> tuple[object, ...] | None:
    row: tuple[object, ...] | None = conn.execute(query, params).fetchone()
    return row


def _table(name: str) -> sql.Identifier:
    return sql.Identifier(CONTROL_SCHEMA, name)


def backfill_done(conn: Conn, tenant: str) -> bool:
    """Whether a backfill has finished since capture was last turned on.

    A return to stage ``jsonb`` voids an earlier one: products changed unseen meanwhile,
    and the table no longer follows them (``checkpoint.log_complete``).
    """
    return checkpoint.log_complete(conn, tenant)


def verify_problem(conn: Conn, tenant: str) -> str | None:
    """Why the tenant's latest verify or reconcile run is not clean, or None if it is.

    A run from before the tenant's latest return to stage ``jsonb`` does not count: the
    legacy writes made while capture was off reached only the JSONB.
    """
    query = sql.SQL(
        "SELECT v.id, v.finished_at IS NOT NULL, v.drift_total, "
        "v.started_at < (SELECT max(a.at) FROM {audit} a "
        "                 WHERE a.tenant = v.tenant AND a.to_stage = 'jsonb') "
        "FROM {runs} v WHERE v.tenant = %s ORDER BY v.id DESC LIMIT 1"
    ).format(runs=_table("verify_runs"), audit=_table("stage_audit"))
    row = _one(conn, query, (tenant,))
    if row is None:
        return "no verify run recorded"
    if row[3]:
        return (
            f"the latest verify run (id {row[0]}) is older than the tenant's last return "
            "to stage jsonb"
        )
    if not row[1]:
        return f"the latest verify run (id {row[0]}) has not finished"
    if row[2] != 0:
        return f"the latest verify run (id {row[0]}) found {row[2]} drifted products"
    return None


def shadow_problem(conn: Conn, tenant: str) -> str | None:
    """Why the shadow period since the last stage change does not allow ``table``.

    Mismatches are counted both in the counter and in the kept rows: the counter may
    skip an increment under contention (services.shadow), the rows never do."""
    query = sql.SQL(
        "SELECT s.reads, greatest(s.mismatches, (SELECT count(*) FROM {m} m "
        "  WHERE m.tenant = t.tenant AND m.at >= t.stage_changed_at)), "
        "s.since >= t.stage_changed_at FROM {t} t "
        "LEFT JOIN {s} s ON s.tenant = t.tenant WHERE t.tenant = %s"
    ).format(t=_table("tenant_state"), s=_table("shadow_stats"), m=_table("shadow_mismatches"))
    row = _one(conn, query, (tenant,))
    if row is None or row[0] is None or not row[2]:
        return "no shadow reads recorded since entering shadow_read"
    if row[1] != 0:
        return f"{row[1]} shadow mismatches since entering shadow_read"
    if row[0] == 0:
        return "no shadow reads recorded since entering shadow_read"
    return None


def jsonb_column_exists(conn: Conn, tenant: str) -> bool:
    """Whether ``tenant.products.images`` exists (the contract migration drops it)."""
    row = conn.execute(
        "SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
        "AND c.relname = 'products' AND a.attname = 'images' AND NOT a.attisdropped",
        (tenant,),
    ).fetchone()
    return row is not None


RESTORE_UNFINISHED = (
    "the contract's restoring downgrade has not finished: products.images is back but only "
    "partly rebuilt from product_images, which are the truth until it is; run "
    "`imgmig deploy rollback` (or `alembic downgrade expand`) again to finish it"
)


def restore_unfinished(conn: Conn, tenant: str) -> bool:
    """Whether the contract's downgrade has started on ``tenant`` and not finished.

    The contract drops ``products.images`` and moves the tenant's Alembic version to
    ``contract`` in one transaction. The downgrade adds the column back first, rebuilds it
    in batches that commit one by one, and moves the version last. So the column existing
    at version ``contract`` means a restore is running, or was killed, and the JSONB of the
    products it has not reached yet is ``[]``.
    """
    return jsonb_column_exists(conn, tenant) and (
        migrate.tenant_revision(conn, tenant) == migrate.CONTRACT
    )


def guard_failures(conn: Conn, tenant: str, current: Stage, target: Stage) -> list[str]:
    """Every guard the move ``current -> target`` fails, in plain words (empty: allowed).

    Raises for a move that ``force`` cannot make safe: leaving ``contracted`` without the
    JSONB column, or making the JSONB the truth again while a restore has left it
    incomplete (the next reconcile would delete the rows of every product not restored).
    """
    if target.rank < Stage.TABLE.rank and restore_unfinished(conn, tenant):
        raise StageRefusedError(
            tenant=tenant, stage=current.value, action=f"move to {target.value}",
            why=RESTORE_UNFINISHED,
        )  # fmt: skip
    if current is Stage.CONTRACTED and target is not current:
        if not jsonb_column_exists(conn, tenant):
            raise StageRefusedError(
                tenant=tenant,
                stage=current.value,
                action=f"move back to {target.value}",
                why="the JSONB column is gone; run the restoring Alembic downgrade first",
            )
        return ["leaving contracted rewires readers to a JSONB column restored by hand"]
    if target.rank < current.rank:
        if target is Stage.JSONB:
            return ["going back to jsonb stops the table following JSONB (re-backfill needed)"]
        return []
    if target.rank > current.rank + 1:
        skipped = [s.value for s in Stage if current.rank < s.rank < target.rank]
        return [f"skips {', '.join(skipped)}"]
    return _forward_guards(conn, tenant, target)


def _forward_guards(conn: Conn, tenant: str, target: Stage) -> list[str]:
    failures: list[str] = []
    if target is Stage.DUAL_WRITE:
        # An interrupted `migrate upgrade` can leave the stage row without the event log.
        at = migrate.tenant_revision(conn, tenant)
        if at not in (migrate.EXPAND, migrate.CONTRACT):
            failures.append(
                f"the tenant's expand migration has not finished (at revision {at}): "
                "run `imgmig migrate upgrade` again"
            )
    if target is Stage.SHADOW_READ and not backfill_done(conn, tenant):
        failures.append("the backfill has not completed")
    if target in (Stage.SHADOW_READ, Stage.TABLE, Stage.CONTRACTED):
        problem = verify_problem(conn, tenant)
        if problem:
            failures.append(problem)
    if target is Stage.TABLE:
        problem = shadow_problem(conn, tenant)
        if problem:
            failures.append(problem)
    if target is Stage.CONTRACTED and jsonb_column_exists(conn, tenant):
        # Without triggers, old instances' JSONB writes would no longer reach the table.
        failures.append("the JSONB column still exists: the contract migration sets contracted")
    return failures


def change_stage(
    conn: Conn,
    tenant: str,
    target: Stage | str,
    *,
    reason: str,
    actor: str | None = None,
    force: bool = False,
) -> Transition:
    """Move one tenant to ``target`` if the guards allow it (or ``force``), in ``conn``'s
    transaction. Steps: 1. lock the tenant's state row; 2. check the guards; 3. set the
    stage, audit it and install the triggers; 4. on entering shadow_read, reset the
    shadow counters so the ``table`` guard only counts this shadow period."""
    wanted = Stage.parse(str(target))
    if not reason.strip():
        raise ReasonRequiredError(action=f"flag set {wanted.value}")
    current = _lock_current(conn, tenant)
    failures = guard_failures(conn, tenant, current, wanted)
    if failures and not force:
        raise GuardRefusedError(
            tenant=tenant, current=current.value, target=wanted.value, reasons=tuple(failures)
        )
    audited = f"{reason} [forced past: {'; '.join(failures)}]" if failures else reason
    stage_mod.set_stage(
        conn, tenant, wanted, reason=audited, actor=actor or getpass.getuser(), force=force
    )
    if wanted is Stage.SHADOW_READ and current is not Stage.SHADOW_READ:
        _reset_shadow(conn, tenant)
    log.info(
        "stage changed", tenant=tenant, from_stage=current.value, to_stage=wanted.value,
        forced=force, overridden=failures,
    )  # fmt: skip
    return Transition(tenant, current, wanted, forced=force, overridden=tuple(failures))


def change_stages(
    conn: Conn,
    tenants: list[str],
    target: Stage | str,
    *,
    reason: str,
    actor: str | None = None,
    force: bool = False,
) -> list[Transition]:
    """``change_stage`` for several tenants, all or nothing (one transaction)."""
    with conn.transaction():
        return [
            change_stage(conn, t, target, reason=reason, actor=actor, force=force) for t in tenants
        ]


def kill_switch(conn: Conn, *, reason: str, actor: str | None = None) -> list[Transition]:
    """Send every tenant back to the safest stage that still has all the data.

    ``table`` and ``shadow_read`` go to ``dual_write`` (JSONB is the truth again, capture
    keeps the table current); ``jsonb`` and ``dual_write`` stay; ``contracted`` stays and
    says why. One transaction per tenant, so a tenant whose triggers cannot be swapped
    (a lock timeout) does not hold the others back: it is reported with its error.
    """
    if not reason.strip():
        raise ReasonRequiredError(action="flag kill-switch")
    with conn.transaction():
        tenants = [state.tenant for state in stage_mod.get_all(conn)]
    results = [_kill_one(conn, t, f"kill switch: {reason}", actor) for t in tenants]
    log.warning(
        "kill switch",
        moved=[r.tenant for r in results if r.from_stage != r.to_stage],
        failed=[r.tenant for r in results if r.error],
    )
    return results


def _kill_one(conn: Conn, tenant: str, reason: str, actor: str | None) -> Transition:
    """Under the tenant's row lock, decide from its current stage and move it."""
    try:
        with conn.transaction():
            current = _lock_current(conn, tenant)
            target = KILL_TARGET.get(current)
            if target is None:
                return _stays(tenant, current)
            if restore_unfinished(conn, tenant):  # the table is the only complete side
                return Transition(tenant, current, current, note=f"stays: {RESTORE_UNFINISHED}")
            return change_stage(conn, tenant, target, reason=reason, actor=actor)
    except ImgmigError as exc:
        with conn.transaction():
            stage = stage_mod.get(conn, tenant).stage
        return Transition(tenant, stage, stage, note="FAILED", error=str(exc))


def _stays(tenant: str, stage: Stage) -> Transition:
    note = "already safe"
    if stage is Stage.CONTRACTED:
        note = "stays contracted: the JSONB column is gone; roll back with the Alembic downgrade"
    return Transition(tenant, stage, stage, note=note)


def _lock_current(conn: Conn, tenant: str) -> Stage:
    query = sql.SQL("SELECT stage FROM {} WHERE tenant = %s FOR UPDATE").format(
        _table("tenant_state")
    )
    row = _one(conn, query, (tenant,))
    if row is None:
        return stage_mod.get(conn, tenant).stage  # raises NotMigratedError
    return Stage(str(row[0]))


def _reset_shadow(conn: Conn, tenant: str) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} AS s (tenant, reads, mismatches, since) VALUES (%s, 0, 0, now()) "
            "ON CONFLICT (tenant) DO UPDATE SET reads = 0, mismatches = 0, since = now()"
        ).format(_table("shadow_stats")),
        (tenant,),
    )
