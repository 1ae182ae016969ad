"""Reconcile: verify, then repair drifted products from the stage's source of truth.

Per tenant, holding the tenant's run lock (``cdc.locks``; a second run exits at once):

1. record a run in ``imgmig.verify_runs``;
2. verify every product (``cdc.verify.check``);
3. repair the drifted products in chunks, each chunk one transaction with the products
   locked ``FOR NO KEY UPDATE`` (live writers wait for one chunk, never lose a write):

   * JSONB is the truth (``dual_write``, ``shadow_read``): clear the table-only values
     of those rows (keeping heuristic labels), then ``imgmig.snapshot`` re-projects the
     current JSONB through the canonical mapping, logging a ``reconcile`` event each;
   * the table is the truth (``table``): rewrite ``products.images`` from the rows with
     ``imgmig.rows_images``, as the reverse trigger would (the capture trigger logs it
     as a ``reconcile`` event and does not project it back);
4. verify the repaired products again: what still differs is ``left_over``;
5. outside ``jsonb``, re-derive the label decisions of the ``metadata`` heuristic
   (``cdc.label_heuristics.refresh_tenant``): they were made on the images as they were
   then, and a product edited since may now decide otherwise (writes only what changed);
6. finish the run row with its exit code: 0 clean, 1 repaired, 2 drift left, 3 error.

Before step 1, a reconcile runs the projector for deferred and logical tenants (after
draining the capture slot, ``cdc.logical``): what they logged and have not applied yet
is lag, not drift.

``verify`` is the same pass without the lock and without step 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psycopg
import structlog
from psycopg import sql

from cdc import label_heuristics, locks, logical, project, runs
from cdc import stage as stage_mod
from cdc import verify as verify_mod
from cdc.db import Conn, connect
from cdc.errors import ImgmigError, StageChangedError, StageRefusedError, TenantBusyError
from cdc.stage import Stage
from cdc.tenants import resolve

log = structlog.get_logger(__name__)

APP_NAME: Final = "imgmig-reconcile"
CHUNK: Final = 500


@dataclass(frozen=True)
class Outcome:
    report: verify_mod.Report
    repaired: int
    left_over: int
    exit_code: int
    error: str | None = None


_LOCK: Final = sql.SQL("SELECT id FROM {} WHERE id = ANY (%s) ORDER BY id FOR NO KEY UPDATE")
_STAGE_NOW: Final = "SELECT stage FROM imgmig.tenant_state WHERE tenant = %s FOR KEY SHARE"
_PROJECTOR_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext('imgmig.project'), hashtext(%s))"

# Table-only values go; heuristic labels stay (the element does not speak for them).
_CLEAR: Final = sql.SQL(
    """UPDATE {} SET alt_text = NULL, tags = '{{}}', mime_type = NULL, file_size = NULL,
              width = NULL, height = NULL,
              is_label = is_label AND label_strategy IS NOT NULL
                         AND label_strategy <> 'explicit'
        WHERE product_id = ANY (%s)"""
)

_FROM_ROWS: Final = sql.SQL(
    """UPDATE {} p SET images = r.images
         FROM imgmig.rows_images(%(tenant)s, %(ids)s) r
        WHERE p.id = r.product_id AND p.images IS DISTINCT FROM r.images"""
)


def check_stage(tenant: str, stage: Stage, *, repair: bool) -> None:
    if stage is Stage.CONTRACTED:
        why = "the JSONB column is gone; there is nothing to compare"
    elif repair and stage is Stage.JSONB:
        why = "no change capture yet; move it to dual_write and run imgmig backfill first"
    else:
        return
    action = "reconcile" if repair else "verify"
    raise StageRefusedError(tenant=tenant, stage=stage.value, action=action, why=why)


def repair(conn: Conn, tenant: str, stage: Stage, ids: Sequence[int]) -> None:
    """Make products ``ids`` equal on both sides again, from the stage's source of truth.

    Each chunk, in one transaction, takes the locks in the service's order: the stage row
    (``FOR KEY SHARE``: no stage change until the chunk commits), the deferred projector's
    lock (its plan for a product cannot straddle the repair), then the products. A stage
    that moved since the verify this repair follows fails the run: which side is the truth
    may have changed with it (:class:`StageChangedError`; run it again).
    """
    for start in range(0, len(ids), CHUNK):
        chunk = list(ids[start : start + CHUNK])
        with conn.transaction():
            now = conn.execute(_STAGE_NOW, (tenant,)).fetchone()
            if now is None or now[0] != stage.value:
                raise StageChangedError(
                    tenant=tenant, was=stage.value, now=str(now[0]) if now else "none"
                )
            conn.execute(_PROJECTOR_LOCK, (tenant,))
            conn.execute(_LOCK.format(sql.Identifier(tenant, "products")), (chunk,))
            if verify_mod.jsonb_is_truth(stage):
                conn.execute(_CLEAR.format(sql.Identifier(tenant, "product_images")), (chunk,))
                conn.execute("SELECT imgmig.snapshot(%s, %s, 'reconcile')", (tenant, chunk))
            else:
                conn.execute(
                    "SELECT set_config('imgmig.source', 'reconcile', true), "
                    "set_config('imgmig.syncing', 'reverse', true)"
                )
                conn.execute(
                    _FROM_ROWS.format(sql.Identifier(tenant, "products")),
                    {"tenant": tenant, "ids": chunk},
                )


def run_tenant(conn: Conn, tenant: str, *, mode: str, do_repair: bool) -> Outcome:
    """One verify or reconcile pass over one tenant, recorded in ``imgmig.verify_runs``."""
    stage = stage_mod.get(conn, tenant).stage
    run_id = runs.start(conn, tenant, mode, stage.value)
    bound = log.bind(tenant=tenant, stage=stage.value, mode=mode)
    try:
        report = verify_mod.check(conn, tenant, stage)
        repaired = left_over = 0
        if do_repair and report.drifted:
            repair(conn, tenant, stage, report.drifted)
            left_over = verify_mod.check_ids(conn, tenant, stage, report.drifted).drift_total
            repaired = report.drift_total - left_over
        else:
            left_over = report.drift_total
        refreshed = 0
        if do_repair and stage is not Stage.JSONB:
            refreshed = label_heuristics.refresh_tenant(conn, tenant)
        code = runs.finish(conn, run_id, report, repaired=repaired, left_over=left_over)
    except (psycopg.Error, StageChangedError) as exc:
        bound.error(f"{mode} failed", error=str(exc).strip())
        _record_failure(conn, run_id)
        return Outcome(verify_mod.Report(tenant, stage), 0, 0, runs.ERROR, str(exc).strip())
    bound.info(
        f"{mode} tenant done",
        products_checked=report.products_checked,
        drift=report.drift,
        drift_total=report.drift_total,
        repaired=repaired,
        left_over=left_over,
        labels_refreshed=refreshed,
        exit_code=code,
    )
    return Outcome(report, repaired, left_over, code)


def _record_failure(conn: Conn, run_id: int) -> None:
    try:
        runs.fail(conn, run_id)
    except psycopg.Error:
        log.warning("could not record the failed run", run_id=run_id)


def run(
    url: str, tenants: Sequence[str] | None, *, mode: str = "reconcile", do_repair: bool = True
) -> list[Outcome]:
    """Verify or reconcile ``tenants``; ``None`` means every tenant it applies to.

    ``mode`` "verify" is read-only and takes no lock; "reconcile" takes the tenants' run
    locks first and repairs unless ``do_repair`` is false. Named tenants are all locked
    or none (busy: exit at once); a run over every tenant skips the busy ones, each with
    exit code 75, and exits at once only if all are busy.
    """
    do_repair = do_repair and mode == "reconcile"
    with connect(url, autocommit=True, application_name=APP_NAME, batch=True) as conn:
        names = _eligible(conn, tenants, do_repair=do_repair)
        skipped: list[Outcome] = []
        if mode == "reconcile" and tenants is None:
            names, skipped = _lock_free(conn, names, mode)
        elif mode == "reconcile":
            locks.lock_all(conn, names, mode)
        if do_repair:
            _catch_up(conn, names)
        return [run_tenant(conn, t, mode=mode, do_repair=do_repair) for t in names] + skipped


def _lock_free(conn: Conn, names: list[str], mode: str) -> tuple[list[str], list[Outcome]]:
    """Every tenant (the cron's run): lock the free ones, skip the busy ones, each with an
    outcome of its own (75, try again later). All busy: exit at once, as before."""
    taken, busy = locks.lock_free(conn, names)
    if busy and not taken:
        tenant, who = busy[0]
        raise TenantBusyError(tenant=tenant, action=mode, holder=who)
    stages = {s.tenant: s.stage for s in stage_mod.get_all(conn, [t for t, _ in busy])}
    skipped = []
    for tenant, who in busy:
        why = TenantBusyError(tenant=tenant, action=mode, holder=who).message()
        log.warning("tenant skipped: another imgmig run holds it", tenant=tenant, holder=who)
        report = verify_mod.Report(tenant, stages[tenant])
        skipped.append(Outcome(report, 0, 0, runs.BUSY, why))
    return taken, skipped


def _catch_up(conn: Conn, tenants: Sequence[str]) -> None:
    """Before verifying: apply what deferred and logical tenants have logged but not
    projected yet (that is lag, not drift), reading the capture slot first. The cron's
    reconcile is what keeps a logical tenant's slot read, and what drops a slot left
    without a tenant."""
    behind = [s.tenant for s in stage_mod.get_all(conn, list(tenants)) if s.projection != "inline"]
    if behind:
        logical.drain(conn)  # once: the slot holds every logical tenant's writes
    for tenant in behind:
        project.project(conn, tenant, drain=False)
    # A slot no tenant uses any more keeps WAL forever. `imgmig project` drops it when
    # the last tenant leaves logical mode, unless it was killed just before.
    try:
        logical.drop_slot_if_unused(conn)
    except psycopg.errors.InsufficientPrivilege as exc:
        log.warning("a capture slot no tenant uses keeps WAL: drop it", error=str(exc))


def _eligible(conn: Conn, tenants: Sequence[str] | None, *, do_repair: bool) -> list[str]:
    names = resolve(conn, tenants)
    chosen = []
    for state in stage_mod.get_all(conn, names):
        if tenants is None and state.stage is Stage.JSONB:
            log.info("tenant skipped: no capture yet", tenant=state.tenant)
            continue
        try:
            check_stage(state.tenant, state.stage, repair=do_repair)
            chosen.append(state.tenant)
        except ImgmigError as exc:
            if tenants is not None:
                raise
            log.warning("tenant skipped", tenant=state.tenant, reason=str(exc))
    if tenants is not None and len(chosen) < len(names):
        missing = sorted(set(names) - set(chosen))
        stage_mod.get(conn, missing[0])  # raises NotMigratedError
    return chosen


#: How bad each exit code is, for the run's one code: what needs a person first.
_SEVERITY: Final = {
    runs.CLEAN: 0,
    runs.REPAIRED: 1,
    runs.BUSY: 2,
    runs.DRIFT_LEFT: 3,
    runs.ERROR: 4,
}


def overall_exit_code(outcomes: Sequence[Outcome]) -> int:
    """The worst tenant decides: 3 error > 2 drift left > 75 a tenant skipped, busy (try
    again later) > 1 repaired > 0 clean."""
    codes = [o.exit_code for o in outcomes]
    return max(codes, key=lambda c: _SEVERITY.get(c, 5), default=runs.CLEAN)
