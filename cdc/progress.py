"""Backfill progress: Rich bars on a terminal, structlog JSON lines otherwise.

Both implement ``cdc.backfill.Progress`` and are called from worker threads (Rich's
``Progress`` is thread-safe; the log reporter throttles per tenant under a lock).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cdc.backfill import Batch, TenantResult
from cdc.replicas import Lag

log = structlog.get_logger("cdc.backfill")


@dataclass
class Silent:
    """Collects batches; for tests and library callers that want no output."""

    batches: list[Batch] = field(default_factory=list)
    pauses: list[str] = field(default_factory=list)
    throttles: list[tuple[str, Lag]] = field(default_factory=list)

    def start(self, tenant: str, total: int, done: int) -> None:
        return None

    def batch(self, batch: Batch) -> None:
        self.batches.append(batch)

    def paused(self, tenant: str) -> None:
        self.pauses.append(tenant)

    def throttled(self, tenant: str, lag: Lag, limit: int) -> None:
        self.throttles.append((tenant, lag))

    def finish(self, result: TenantResult) -> None:
        return None


@dataclass
class LogLines:
    """One JSON line per tenant per ``every_s`` seconds, plus start, pause and finish;
    while a tenant waits for a lagging replica, one line per ``wait_every_s``."""

    every_s: float = 1.0
    wait_every_s: float = 30.0  # while a tenant waits for a replica, one line this often
    _last: dict[str, float] = field(default_factory=dict)
    _last_wait: dict[str, float] = field(default_factory=dict)
    _done: dict[str, int] = field(default_factory=dict)
    _total: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, tenant: str, total: int, done: int) -> None:
        with self._lock:
            self._total[tenant], self._done[tenant] = total, done
            self._last[tenant] = time.monotonic()
        log.info("backfill started", tenant=tenant, products_total=total, products_done=done)

    def batch(self, batch: Batch) -> None:
        with self._lock:
            self._done[batch.tenant] = self._done.get(batch.tenant, 0) + batch.products
            now = time.monotonic()
            if now - self._last.get(batch.tenant, 0.0) < self.every_s:
                return
            self._last[batch.tenant] = now
            done, total = self._done[batch.tenant], self._total.get(batch.tenant, 0)
        log.info(
            "backfill progress",
            tenant=batch.tenant,
            products_done=done,
            products_total=total,
            last_id=batch.last_id,
            batch_size=batch.batch_size,
            batch_ms=round(batch.elapsed_s * 1000, 1),
        )

    def paused(self, tenant: str) -> None:
        log.info("backfill paused; waiting for imgmig backfill resume", tenant=tenant)

    def throttled(self, tenant: str, lag: Lag, limit: int) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_wait.get(tenant, -self.wait_every_s) < self.wait_every_s:
                return
            self._last_wait[tenant] = now
        log.warning(
            "replication lag over the limit; waiting for the consumer to catch up",
            tenant=tenant,
            consumer=lag.consumer,
            lag_bytes=lag.bytes,
            limit_bytes=limit,
        )

    def finish(self, result: TenantResult) -> None:
        log.info(
            "backfill finished",
            tenant=result.tenant,
            status=result.status,
            products=result.products,
            rows=result.rows,
            batches=result.batches,
            malformed=result.malformed,
            reconnects=result.reconnects,
            replica_wait_s=round(result.replica_wait_s, 1),
            fk_check_skipped_batches=result.fk_check_skipped,
            error=result.error,
        )


@dataclass
class Bars:
    """Rich progress: one bar per tenant and one for the total, with rows/s and ETA."""

    bars: Progress
    _tasks: dict[str, TaskID] = field(default_factory=dict)
    _total: TaskID | None = None

    def start(self, tenant: str, total: int, done: int) -> None:
        self._tasks[tenant] = self.bars.add_task(tenant, total=total, completed=done)
        if self._total is None:
            self._total = self.bars.add_task("total", total=0)
        task = self.bars.tasks[self._total]
        self.bars.update(
            self._total, total=(task.total or 0) + total, completed=task.completed + done
        )

    def batch(self, batch: Batch) -> None:
        # the description also clears a "(paused)" or "(waiting ...)" once batches go on
        task = self._tasks[batch.tenant]
        self.bars.update(task, advance=batch.products, description=batch.tenant)
        if self._total is not None:
            self.bars.advance(self._total, batch.products)

    def paused(self, tenant: str) -> None:
        self.bars.update(self._tasks[tenant], description=f"{tenant} (paused)")

    def throttled(self, tenant: str, lag: Lag, limit: int) -> None:
        self.bars.update(self._tasks[tenant], description=f"{tenant} (waiting: {lag})")

    def finish(self, result: TenantResult) -> None:
        task = self._tasks.get(result.tenant)
        if task is not None:
            self.bars.update(task, description=f"{result.tenant} ({result.status})")


class RateColumn(ProgressColumn):
    """Products per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.0f} products/s")


@contextmanager
def bars(console: Console) -> Iterator[Bars]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        yield Bars(progress)
