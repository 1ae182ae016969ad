"""Backfill: project every product's history into ``product_images``, online and resumable.

Per tenant, in keyset batches over ``products.id``, each batch one transaction:

1. lock the batch's products ``FOR NO KEY UPDATE`` and project their *current* JSONB
   through the canonical mapping (``imgmig.snapshot``: one set-based statement that
   logs an ``images.snapshot`` event per product and diffs the rows). The lock is taken
   before the JSONB is read, so a live write either committed first (and we read its
   value) or waits for this batch; older data never overwrites newer. Where the role may,
   that statement runs without PostgreSQL's check of ``product_images.product_id``, which
   its own lock already proves (``cdc.fkcheck`` says when and why);
2. log an ``images.malformed`` event (with the original JSONB) for each product whose
   array has problems; the mapping has already projected its well-formed elements;
3. apply the enabled heuristic label strategies (``cdc.labels``);
4. advance the checkpoint, then commit, asynchronously (``_BATCH_SETTINGS`` says why
   that is safe).

Between batches: the pause switch, the replication-lag limit (``cdc.replicas``), the rate
limit and the batch-size controller. A lost connection rolls the open batch back; the
worker reconnects and resumes from the checkpoint. One advisory lock per tenant
(``cdc.locks``) keeps two runs apart.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, Protocol

import psycopg
import structlog
from psycopg import errors, sql

from cdc import capture, checkpoint, fkcheck, labels, locks, replicas
from cdc import stage as stage_mod
from cdc.db import Conn, connect
from cdc.errors import ImgmigError, StageRefusedError
from cdc.pacing import BatchSizer, RateLimiter
from cdc.stage import Stage
from cdc.tenants import CONTROL_SCHEMA, resolve

log = structlog.get_logger(__name__)

APP_NAME: Final = "imgmig-backfill"
ALLOWED: Final = (Stage.DUAL_WRITE, Stage.SHADOW_READ)
LOCK_RETRIES: Final = 8


@dataclass(frozen=True, kw_only=True)
class BackfillConfig:
    batch_size: int = 500
    sizer: BatchSizer = field(default_factory=BatchSizer)
    max_rate: float | None = None  # image rows per second, per tenant
    workers: int = 2
    label_strategies: tuple[str, ...] = labels.DEFAULT
    restart: bool = False
    pause_poll_s: float = 0.5
    max_replica_lag: int | None = replicas.DEFAULT_MAX_LAG  # bytes; None: no limit
    replica_lag_ignore: tuple[str, ...] = ()  # application names, e.g. a delayed standby
    lock_timeout_ms: int = 2000
    reconnect_attempts: int = 8
    fk_check: str = "auto"  # auto: skip the check the batch proves, where allowed (fkcheck)


@dataclass(frozen=True)
class Batch:
    tenant: str
    products: int
    rows: int
    last_id: int
    elapsed_s: float
    batch_size: int
    malformed: int
    labelled: int


@dataclass
class TenantResult:
    tenant: str
    status: str = "running"  # done | failed
    products: int = 0
    rows: int = 0
    batches: int = 0
    malformed: int = 0
    reconnects: int = 0
    replica_wait_s: float = 0.0  # time spent waiting for lagging WAL consumers
    fk_check_skipped: int = 0  # batches that skipped the product_id check (cdc.fkcheck)
    error: str | None = None


class Progress(Protocol):
    def start(self, tenant: str, total: int, done: int) -> None: ...
    def batch(self, batch: Batch) -> None: ...
    def paused(self, tenant: str) -> None: ...
    def throttled(self, tenant: str, lag: replicas.Lag, limit: int) -> None: ...  # each poll
    def finish(self, result: TenantResult) -> None: ...


_LOCK_AND_PROJECT: Final = sql.SQL(
    """WITH locked AS (
           SELECT id FROM {products}
            WHERE id > %(after)s AND id <= %(max_id)s
            ORDER BY id LIMIT %(limit)s
              FOR NO KEY UPDATE
       ), batch AS (SELECT array_agg(id ORDER BY id) AS ids FROM locked)
       SELECT b.ids, s.changed, s.malformed
         FROM batch b, imgmig.snapshot_batch(%(tenant)s, b.ids, 'backfill', true) AS s"""
)


# Per batch transaction: its lock_timeout, and asynchronous commit. A batch writes only
# derived data (rows, snapshot events, label decisions) together with the checkpoint that
# says it was done, so a server crash that loses its commit loses both: the resumed run
# redoes the batch from the products, which the batch never writes. The worker then does
# not wait for each batch's WAL flush (several MB; 10-30 ms on a slow disk, up to a third
# of a 100 ms batch); the WAL writer flushes it within 3 x wal_writer_delay, and any later
# synchronous commit (the run's final one, an application write) flushes it first.
_BATCH_SETTINGS: Final = sql.SQL(
    "SELECT set_config('lock_timeout', %s, true), set_config('synchronous_commit', 'off', true)"
)

_STAGE_FOR_SHARE: Final = sql.SQL("SELECT stage FROM {} WHERE tenant = %s FOR SHARE").format(
    sql.Identifier(CONTROL_SCHEMA, "tenant_state")
)


def lock_and_project(tenant: str) -> sql.Composed:
    """The batch statement: lock the next products, project their current JSONB."""
    return _LOCK_AND_PROJECT.format(products=sql.Identifier(tenant, "products"))


def check_stage(conn: Conn, tenant: str) -> None:
    """Refuse tenants whose stage makes a backfill unsafe or pointless."""
    current = stage_mod.get(conn, tenant).stage
    if current in ALLOWED:
        return
    why = (
        "no change capture yet, so writes made during the backfill would be lost; "
        "move it to dual_write first (imgmig flag set dual_write)"
        if current is Stage.JSONB
        else "the table is already the source of truth; use imgmig reconcile instead"
    )
    raise StageRefusedError(tenant=tenant, stage=current.value, action="backfill", why=why)


def choose_tenants(conn: Conn, wanted: Sequence[str] | None) -> list[str]:
    """Named tenants must all be eligible; ``None`` (``--all``) skips ineligible ones."""
    names = resolve(conn, wanted)
    if wanted is not None:
        for tenant in names:
            check_stage(conn, tenant)
        return names
    eligible = []
    for tenant in names:
        try:
            check_stage(conn, tenant)
            eligible.append(tenant)
        except ImgmigError as exc:
            log.warning("tenant skipped", tenant=tenant, reason=str(exc))
    return eligible


def run(
    url: str,
    tenants: Sequence[str] | None,
    config: BackfillConfig,
    progress: Progress,
) -> list[TenantResult]:
    """Backfill ``tenants`` (``None``: every eligible tenant) in parallel workers."""
    strategies = labels.resolve(config.label_strategies)
    with connect(url, autocommit=True, application_name=APP_NAME) as lock_conn:
        names = choose_tenants(lock_conn, tenants)
        locks.lock_all(lock_conn, names, "backfill")
        with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
            futures = [pool.submit(run_tenant, url, t, config, strategies, progress) for t in names]
            return [f.result() for f in futures]


def run_tenant(
    url: str,
    tenant: str,
    config: BackfillConfig,
    strategies: Sequence[labels.LabelStrategy],
    progress: Progress,
) -> TenantResult:
    """One worker: batches until done, reconnecting from the checkpoint on connection loss."""
    worker = _Worker(tenant, config, tuple(strategies), progress)
    bound = log.bind(tenant=tenant)
    restart = config.restart
    result = worker.result
    while True:
        try:
            with connect(url, autocommit=True, application_name=APP_NAME, batch=True) as conn:
                worker.drive(conn, restart=restart)
            result.status = "done"
            break
        except psycopg.OperationalError as exc:
            restart = False  # the checkpoint now holds this run's position
            result.reconnects += 1
            bound.warning("connection lost; resuming from checkpoint", error=str(exc).strip())
            if result.reconnects > config.reconnect_attempts:
                result.status, result.error = "failed", str(exc).strip()
                break
            time.sleep(min(5.0, 0.1 * 2**result.reconnects))
        except (ImgmigError, psycopg.Error) as exc:
            result.status, result.error = "failed", str(exc).strip()
            bound.error("backfill failed", error=result.error)
            break
    progress.finish(result)
    return result


@dataclass
class _Worker:
    tenant: str
    config: BackfillConfig
    strategies: tuple[labels.LabelStrategy, ...]
    progress: Progress
    result: TenantResult = field(init=False)
    _unseen_checked: bool = field(default=False, init=False)
    # The connection's own session_replication_role when batches may skip the product_id
    # check (cdc.fkcheck), else None; and whether the reason they do not was logged.
    _role: str | None = field(default=None, init=False)
    _fk_told: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.result = TenantResult(self.tenant)

    def drive(self, conn: Conn, *, restart: bool) -> None:
        """Batches from the checkpoint to ``max_id``, then mark the tenant done."""
        with conn.transaction():
            check_stage(conn, self.tenant)
            cp = checkpoint.read(conn, self.tenant)
            if cp is not None and not restart and checkpoint.capture_gap(conn, cp):
                log.warning("capture was off since this backfill began; starting over",
                            tenant=self.tenant)  # fmt: skip
                restart = True
            if cp is not None and cp.status == "done" and not restart:
                return
            cp = checkpoint.start(conn, self.tenant, restart=restart)
        self._role = fkcheck.allowed(conn) if self.config.fk_check == "auto" else None
        if self._role is None and self.config.fk_check == "auto":
            self._tell_fk("the role may not set session_replication_role")
        total = cp.products_done + checkpoint.remaining(conn, self.tenant, cp)
        self.progress.start(self.tenant, total, cp.products_done)
        size = cp.batch_size or self.config.batch_size
        limiter = RateLimiter(self.config.max_rate)
        after, max_id = cp.last_id, cp.max_id or 0
        while after < max_id:
            self._wait_while_paused(conn)
            self._wait_for_replicas(conn)
            batch = self._one_batch(conn, after, max_id, size)
            if batch is None:
                break
            self._account(batch)
            after = batch.last_id
            size = self.config.sizer.next(size, batch.elapsed_s)
            limiter.wait(batch.rows)
        with conn.transaction():
            checkpoint.finish(conn, self.tenant)
            capture.refresh_log_function(conn, self.tenant)  # the log is complete now

    def _account(self, batch: Batch) -> None:
        self.result.products += batch.products
        self.result.rows += batch.rows
        self.result.malformed += batch.malformed
        self.result.batches += 1
        self.progress.batch(batch)

    def _one_batch(self, conn: Conn, after: int, max_id: int, size: int) -> Batch | None:
        """One batch in one transaction, retried whole on a lock timeout or deadlock.

        A writer holding a product row for long makes the batch give up its locks (after
        ``lock_timeout``) and retry smaller, rather than queue other writers behind it.
        """
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                with conn.transaction():
                    return self._batch_body(conn, after, max_id, size, started)
            except (errors.LockNotAvailable, errors.DeadlockDetected) as exc:
                if attempt >= LOCK_RETRIES:
                    raise
                log.warning(
                    "batch lock conflict; retrying smaller",
                    tenant=self.tenant,
                    attempt=attempt,
                    error=type(exc).__name__,
                )
                size = max(self.config.sizer.minimum, size // 2)
                time.sleep(0.05 * attempt)

    def _batch_body(
        self, conn: Conn, after: int, max_id: int, size: int, started: float
    ) -> Batch | None:
        tenant = self.tenant
        conn.execute(_BATCH_SETTINGS, (f"{self.config.lock_timeout_ms}ms",))
        self._recheck_stage(conn)
        role = self._role if self._role is not None and self._may_skip_fk_check(conn) else None
        row = conn.execute(
            lock_and_project(tenant),
            {"after": after, "max_id": max_id, "limit": size, "tenant": tenant},
        ).fetchone()
        if role is not None:
            fkcheck.leave(conn, role)
            self.result.fk_check_skipped += 1
        ids: list[int] = list(row[0]) if row and row[0] else []
        if not row or not ids:
            checkpoint.advance(conn, tenant, last_id=max_id, products=0, rows=0, batch_size=size)
            return None
        rows, malformed = int(row[1] or 0), int(row[2] or 0)
        labelled = labels.apply(conn, tenant, ids, self.strategies)
        checkpoint.advance(
            conn, tenant, last_id=ids[-1], products=len(ids), rows=rows, batch_size=size
        )
        elapsed = time.monotonic() - started
        return Batch(tenant, len(ids), rows, ids[-1], elapsed, size, max(malformed, 0), labelled)

    def _may_skip_fk_check(self, conn: Conn) -> bool:
        others = fkcheck.enter(conn, self.tenant)
        if others:
            self._tell_fk("other triggers would be skipped with it", triggers=others)
        return not others

    def _tell_fk(self, why: str, **detail: object) -> None:
        """Once per worker: why its batches keep the product_id foreign-key check."""
        if not self._fk_told:
            self._fk_told = True
            log.info("backfill batches keep the product_id foreign-key check",
                     tenant=self.tenant, why=why, **detail)  # fmt: skip

    def _recheck_stage(self, conn: Conn) -> None:
        """Hold the stage for the batch: a rollback to jsonb waits for it, then stops us."""
        row = conn.execute(_STAGE_FOR_SHARE, (self.tenant,)).fetchone()
        current = Stage(row[0]) if row else Stage.JSONB
        if current not in ALLOWED:
            raise StageRefusedError(
                tenant=self.tenant,
                stage=current.value,
                action="continue the backfill",
                why="the stage changed while it ran; the checkpoint is kept for a later run",
            )

    def _wait_while_paused(self, conn: Conn) -> None:
        announced = False
        while checkpoint.paused(conn):
            if not announced:
                self.progress.paused(self.tenant)
                announced = True
            time.sleep(self.config.pause_poll_s)

    def _wait_for_replicas(self, conn: Conn) -> None:
        """Wait, holding no lock, while a WAL consumer is over the lag limit."""
        limit = self.config.max_replica_lag
        if not limit:
            return
        began: float | None = None
        ignore = self.config.replica_lag_ignore
        while (lag := replicas.furthest(conn, ignore)) is not None and lag.bytes > limit:
            self.progress.throttled(self.tenant, lag, limit)  # each poll: the lag as it moves
            began = time.monotonic() if began is None else began
            time.sleep(self.config.pause_poll_s)
        if began is not None:
            waited = time.monotonic() - began
            self.result.replica_wait_s += waited
            log.info("replicas caught up; backfill goes on", tenant=self.tenant,
                     waited_s=round(waited, 1))  # fmt: skip
        elif lag is None and not self._unseen_checked:
            self._unseen_checked = True  # once per worker: a query less per batch
            if replicas.unseen(conn):
                log.warning(
                    "cannot read the replication lag (needs pg_read_all_stats); not throttling",
                    tenant=self.tenant,
                )


def pause(url: str) -> None:
    """Ask running backfills to stop after their current batch (they wait, holding no lock)."""
    with connect(url, autocommit=True) as conn:
        checkpoint.set_paused(conn, True)


def resume(url: str) -> None:
    with connect(url, autocommit=True) as conn:
        checkpoint.set_paused(conn, False)
