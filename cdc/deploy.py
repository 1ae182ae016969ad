"""``imgmig deploy``: the zero-downtime sequence, per tenant, resumable.

expand → dual_write → backfill → verify → shadow_read → table (canaries first) → contract

There is no separate deploy state: the next step of each tenant is derived from what the
database says (its Alembic version, stage, backfill checkpoint, last verify, shadow
counters). So every step is idempotent, and a run killed between two steps (or inside
one) resumes where the database says it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import structlog
from psycopg import sql

from cdc import (
    backfill,
    capture,
    contract,
    cutover,
    label_heuristics,
    labels,
    migrate,
    project,
    reconcile,
)
from cdc import stage as stage_mod
from cdc.backfill import BackfillConfig, Progress
from cdc.db import Conn, connect
from cdc.errors import DeployStoppedError
from cdc.progress import Silent
from cdc.stage import Stage
from cdc.tenants import CONTROL_SCHEMA, resolve

log = structlog.get_logger(__name__)


class Step(StrEnum):
    EXPAND = "expand"
    DUAL_WRITE = "dual_write"
    BACKFILL = "backfill"
    VERIFY = "verify"
    SHADOW_READ = "shadow_read"
    TABLE = "table"
    CONTRACT = "contract"


@dataclass(frozen=True, kw_only=True)
class DeployOptions:
    canary: tuple[str, ...] = ()
    confirm_contract: bool = False
    shadow_wait_s: float = 60.0
    reader_wait_s: float = 15.0
    contract_min_table_age_s: float = 3600.0
    reason: str = "imgmig deploy"
    # Production deploys detect labels: explicit flags, imported legacy evidence, metadata.
    backfill: BackfillConfig = field(
        default_factory=lambda: BackfillConfig(label_strategies=labels.RECOMMENDED)
    )


@dataclass(frozen=True)
class TenantStatus:
    tenant: str
    stage: str
    next_step: str
    backfill: str
    last_verify: str
    shadow: str


OnStep = Callable[[str, Step], None]


def next_step(conn: Conn, tenant: str) -> Step | None:
    """What this tenant needs next; None once it is contracted."""
    state = stage_mod.get_all(conn, [tenant])
    if not state or not _at_expand(conn, tenant):
        return Step.EXPAND
    return _stage_step(conn, tenant, state[0].stage)


def _stage_step(conn: Conn, tenant: str, current: Stage) -> Step | None:
    """The next step after expand, from the stage (one return per stage)."""
    if current is Stage.JSONB:
        return Step.DUAL_WRITE
    if current is Stage.DUAL_WRITE:
        if not cutover.backfill_done(conn, tenant):
            return Step.BACKFILL
        return Step.VERIFY if cutover.verify_problem(conn, tenant) else Step.SHADOW_READ
    if current is Stage.SHADOW_READ:
        return Step.VERIFY if cutover.verify_problem(conn, tenant) else Step.TABLE
    if current is Stage.TABLE:
        return Step.CONTRACT
    return None


def _at_expand(conn: Conn, tenant: str) -> bool:
    """Expanded, with every additive revision of this release run (the ledger says)."""
    at = migrate.tenant_revision(conn, tenant)
    return at == migrate.CONTRACT or (
        at == migrate.EXPAND and not migrate.skipped_revisions(conn, tenant)
    )


def plan(conn: Conn, tenants: Sequence[str] | None) -> dict[str, list[Step]]:
    """The steps each tenant still has to go through, in order."""
    order = list(Step)
    out = {}
    for tenant in resolve(conn, tenants):
        first = next_step(conn, tenant)
        out[tenant] = [] if first is None else order[order.index(first) :]
        state = stage_mod.get_all(conn, [tenant]) if first is Step.EXPAND else []
        if state:  # expanded before: the revisions it skipped, then where its stage is
            then = _stage_step(conn, tenant, state[0].stage)
            out[tenant] = [Step.EXPAND] + ([] if then is None else order[order.index(then) :])
    return out


def run(
    url: str,
    tenants: Sequence[str] | None,
    options: DeployOptions,
    *,
    on_step: OnStep | None = None,
    progress: Progress | None = None,
) -> dict[str, Step | None]:
    """Run the sequence until every tenant is contracted (or stops at ``table`` without
    ``confirm_contract``). Canary tenants reach ``table`` before the others start it."""
    with connect(url, autocommit=True) as conn:
        names = resolve(conn, tenants)
    canaries = [t for t in names if t in options.canary]
    rest = [t for t in names if t not in options.canary]

    def step_done(tenant: str, step: Step) -> None:
        log.info("deploy step done", tenant=tenant, step=step.value)
        if on_step is not None:
            on_step(tenant, step)

    runner = _Runner(url, options, step_done, progress or Silent())
    for group in [canaries, rest] if canaries else [rest]:
        runner.advance(group, until=Step.CONTRACT)
    runner.advance(names, until=None)
    with connect(url, autocommit=True) as conn:
        return {t: next_step(conn, t) for t in names}


@dataclass
class _Runner:
    url: str
    options: DeployOptions
    on_step: OnStep
    progress: Progress

    def advance(self, tenants: list[str], *, until: Step | None) -> None:
        """Apply next steps to ``tenants`` until each reaches ``until`` (None: the end)."""
        pending = list(tenants)
        while pending:
            with connect(self.url, autocommit=True) as conn:
                steps = {t: next_step(conn, t) for t in pending}
            pending = [t for t, s in steps.items() if s is not None and s != until]
            if not pending:
                return
            if any(steps[t] is Step.CONTRACT for t in pending):
                self._contract([t for t in pending if steps[t] is Step.CONTRACT])
            for tenant in pending:
                step = steps[tenant]
                if step is not None and step is not Step.CONTRACT:
                    self._do(tenant, step)
                    self.on_step(tenant, step)

    def _do(self, tenant: str, step: Step) -> None:
        if step is Step.EXPAND:
            migrate.upgrade(self.url, tenants=[tenant], revision=migrate.EXPAND)
        elif step is Step.BACKFILL:
            results = backfill.run(self.url, [tenant], self.options.backfill, self.progress)
            if any(r.status != "done" for r in results):
                raise DeployStoppedError(tenant=tenant, step=step.value, why="backfill failed")
        elif step is Step.VERIFY:
            self._verify(tenant)
        elif step is Step.TABLE:
            if self._empty(tenant):  # nothing to read, so no shadow period to wait for
                self._stage(tenant, Stage.TABLE, force_why="empty tenant: nothing to shadow-read")
            else:
                self._wait_for_shadow(tenant)
                self._refresh_labels(tenant)
                self._stage(tenant, Stage.TABLE)
        else:
            self._stage(tenant, Stage(step.value))

    def _stage(self, tenant: str, target: Stage, *, force_why: str | None = None) -> None:
        reason = f"{self.options.reason}: {force_why}" if force_why else self.options.reason
        if target is Stage.TABLE:
            self._to_inline(tenant)
        with connect(self.url) as conn:
            cutover.change_stage(conn, tenant, target, reason=reason, force=force_why is not None)
            conn.commit()

    def _to_inline(self, tenant: str) -> None:
        """Stage table needs inline projection (``cdc.capture.apply_stage`` says why): a
        deferred or logical tenant switches first, which applies what is pending."""
        with connect(self.url, autocommit=True) as conn:
            mode = capture.projection_of(conn, tenant)
            if mode != "inline":
                project.switch(conn, tenant, "inline")
                log.info("projection inline before stage table", tenant=tenant, was=mode)

    def _refresh_labels(self, tenant: str) -> None:
        """Before the table is served: label decisions re-derived on today's images."""
        with connect(self.url, autocommit=True, batch=True) as conn:
            changed = label_heuristics.refresh_tenant(conn, tenant)
        log.info("label decisions refreshed", tenant=tenant, changed=changed)

    def _empty(self, tenant: str) -> bool:
        with connect(self.url, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(
                    sql.Identifier(tenant, "products")
                )
            ).fetchone()
        return bool(row and row[0])

    def _verify(self, tenant: str) -> None:
        """Reconcile (repairing drift), then a read-only verify that must come out clean."""
        reconcile.run(self.url, [tenant], mode="reconcile")
        outcome = reconcile.run(self.url, [tenant], mode="verify")
        if any(o.exit_code != 0 for o in outcome):
            raise DeployStoppedError(
                tenant=tenant, step="verify", why="drift is left after reconcile"
            )

    def _wait_for_shadow(self, tenant: str) -> None:
        deadline = time.monotonic() + self.options.shadow_wait_s
        while True:
            with connect(self.url, autocommit=True) as conn:
                problem = cutover.shadow_problem(conn, tenant)
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise DeployStoppedError(tenant=tenant, step="table", why=problem)
            time.sleep(0.5)

    def _wait_for_readers(self, tenants: list[str]) -> None:
        """Services pick up a stage change within a second; give their heartbeats time to
        say so before the contract's guard looks for JSONB readers."""
        deadline = time.monotonic() + self.options.reader_wait_s
        while time.monotonic() < deadline:
            with connect(self.url, autocommit=True) as conn:
                readers = [r for t in tenants for r in contract.jsonb_readers(conn, t)]
            if not readers:
                return
            time.sleep(0.5)

    def _contract(self, tenants: list[str]) -> None:
        with connect(self.url, autocommit=True) as conn:
            unfinished = [t for t in tenants if cutover.restore_unfinished(conn, t)]
        if unfinished:  # Alembic is at contract already: its upgrade would change nothing
            raise DeployStoppedError(
                tenant=", ".join(unfinished), step="contract", why=cutover.RESTORE_UNFINISHED
            )
        if not self.options.confirm_contract:
            raise DeployStoppedError(
                tenant=", ".join(tenants), step="contract",
                why="dropping products.images needs --confirm-contract",
            )  # fmt: skip
        self._wait_for_readers(tenants)
        migrate.upgrade(
            self.url, tenants=tenants, revision=migrate.CONTRACT,
            options={"contract_min_table_age": str(self.options.contract_min_table_age_s)},
        )  # fmt: skip
        for tenant in tenants:
            self.on_step(tenant, Step.CONTRACT)


ROLLBACK_TO = {
    Stage.TABLE: Stage.SHADOW_READ,
    Stage.SHADOW_READ: Stage.DUAL_WRITE,
    Stage.DUAL_WRITE: Stage.JSONB,
}


def rollback(
    url: str, tenants: Sequence[str] | None, *, to: Stage | None = None, reason: str
) -> dict[str, Stage]:
    """Go back one safe step (or step by step down to ``to``); returns the new stages.

    ``contracted`` goes back through the restoring Alembic downgrade, and so does a tenant
    whose downgrade was killed before it finished (:func:`cutover.restore_unfinished`);
    every other step is a flag flip. Going below ``dual_write`` to ``jsonb`` needs an
    explicit ``to=jsonb``.
    """
    with connect(url, autocommit=True) as conn:
        names = resolve(conn, tenants)
    out = {}
    for tenant in names:
        while True:
            with connect(url) as conn:
                current = stage_mod.get(conn, tenant).stage
                unfinished = cutover.restore_unfinished(conn, tenant)
            # A restore that was killed left the stage at table: finish it first.
            target = Stage.TABLE if unfinished else _one_back(current, to)
            if target is None:
                break
            if current is Stage.CONTRACTED or unfinished:
                if unfinished:
                    log.warning("finishing an interrupted restore", tenant=tenant)
                    current = Stage.CONTRACTED
                migrate.downgrade(url, migrate.EXPAND, tenants=[tenant])
            else:
                with connect(url) as conn:
                    cutover.change_stage(
                        conn, tenant, target, reason=reason, force=target is Stage.JSONB
                    )
                    conn.commit()
            log.info("rolled back", tenant=tenant, from_stage=current.value, to_stage=target.value)
            if to is None:
                break
        with connect(url) as conn:
            out[tenant] = stage_mod.get(conn, tenant).stage
    return out


def _one_back(current: Stage, to: Stage | None) -> Stage | None:
    if to is not None and current.rank <= to.rank:
        return None
    if current is Stage.CONTRACTED:
        return Stage.TABLE
    if current is Stage.DUAL_WRITE and to is not Stage.JSONB:
        return None
    return ROLLBACK_TO.get(current)


def status(conn: Conn, tenants: Sequence[str] | None) -> list[TenantStatus]:
    """Stage, next step, backfill progress, last verify and shadow counters per tenant."""
    out = []
    for tenant in resolve(conn, tenants):
        states = stage_mod.get_all(conn, [tenant])
        step = next_step(conn, tenant)
        out.append(
            TenantStatus(
                tenant=tenant,
                stage=states[0].stage.value if states else "not migrated",
                next_step=(
                    "rollback: finish the restore"
                    if cutover.restore_unfinished(conn, tenant)
                    else step.value
                    if step
                    else "done"
                ),
                backfill=_fmt(conn, _BACKFILL, tenant),
                last_verify=_fmt(conn, _VERIFY, tenant),
                shadow=_fmt(conn, _SHADOW, tenant),
            )
        )
    return out


_BACKFILL = sql.SQL(
    "SELECT status || ' ' || products_done || '/' || coalesce(max_id::text, '?') "
    "|| ' products, ' || rows_done || ' rows' FROM {} WHERE tenant = %s"
).format(sql.Identifier(CONTROL_SCHEMA, "backfill_state"))
_VERIFY = sql.SQL(
    "SELECT mode || ' ' || to_char(started_at, 'HH24:MI:SS') || ': drift ' || drift_total "
    "|| ', repaired ' || repaired || ', left ' || left_over FROM {} WHERE tenant = %s "
    "ORDER BY id DESC LIMIT 1"
).format(sql.Identifier(CONTROL_SCHEMA, "verify_runs"))
_SHADOW = sql.SQL(
    "SELECT reads || ' reads, ' || mismatches || ' mismatches' FROM {} WHERE tenant = %s"
).format(sql.Identifier(CONTROL_SCHEMA, "shadow_stats"))


def _fmt(conn: Conn, query: sql.Composed, tenant: str) -> str:
    if not stage_mod.get_all(conn, [tenant]):
        return "-"
    row = conn.execute(query, (tenant,)).fetchone()
    return str(row[0]) if row and row[0] is not None else "-"
