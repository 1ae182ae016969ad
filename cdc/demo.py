"""``imgmig demo``: the whole migration under live traffic, on the embedded PostgreSQL.

1. start (or reuse) the embedded server whose data lives in ``.imgmig/pgdata``, and seed
   the StoFlow-like tenants (reseeding when a previous run left them migrated);
2. start live traffic: a legacy writer (raw JSONB), a service writer and an API writer
   (a real uvicorn server), each recording its writes in an independent ledger;
3. run the deploy sequence: expand → dual_write → backfill → verify → shadow_read →
   table (canary first); retire the legacy writer; contract;
4. round trip: the restoring downgrade of one tenant, killed before it finishes (as a
   crash would) and the kill switch pressed (the tenant must stay at ``table``), then
   finished by ``deploy rollback``; the other tenants' downgrade, a verify, and the
   contract again;
5. stop the traffic and report: images before/after, lost/duplicate/misordered images
   against the ledger, drift, labels in marketplace payloads, label precision/recall,
   the longest DDL lock wait, write p50/p99 per phase. Exit 0 only if there is no loss,
   no drift and no label in any payload.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import httpx
import psycopg
import structlog
import uvicorn
from psycopg import sql

from cdc import cutover, deploy, label_heuristics, migrate, reconcile, seed
from cdc.db import Conn, connect
from cdc.ddl import LOCK_WAITS
from cdc.demo_report import (
    Comparison,
    LabelMetrics,
    Published,
    compare,
    initial_ledger,
    label_metrics,
    published_labels,
)
from cdc.errors import DeployStoppedError
from cdc.server import Server, check_reachable, start_embedded, stop_embedded
from cdc.stage import Stage
from cdc.tenants import resolve
from cdc.traffic import Ledger, LegacyWriter, Phase, Stats, Writer
from cdc.traffic_new_code import ApiWriter, ServiceWriter
from services import api_keys
from services.api import create_app

log = structlog.get_logger(__name__)

Say = Callable[[str], None]


@dataclass
class DemoResult:
    reseeded: bool
    images_before: int = 0
    table: Comparison = field(default_factory=Comparison)
    drift: int = -1
    labels: LabelMetrics = field(default_factory=lambda: LabelMetrics(0, 0, 0))
    published: Published = field(default_factory=lambda: Published(0, 0, 0))
    stats: Stats = field(default_factory=Stats)
    longest_lock_wait_s: float = 0.0
    longest_lock_statement: str = ""
    interrupted_restore: str = "not run"
    kill_switch_moved: str = ""  # where the kill switch sent the half-restored tenant
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@contextlib.contextmanager
def demo_server(url: str | None) -> Iterator[Server]:
    """The given server, or the demo's persistent embedded one (stopped at the end)."""
    if url:
        check_reachable(url)
        yield Server(url=url, kind="url")
        return
    server, handle = start_embedded(migrate.DEMO_PGDATA)
    try:
        yield server
    finally:
        stop_embedded(handle)


def prepare(url: str, config: seed.SeedConfig, *, reseed: bool) -> bool:
    """Seed unless a fresh, unmigrated seed with the same parameters is there."""
    with connect(url) as conn:
        fresh = seed.seeded_with(conn) == asdict(config) and not _migrated(conn)
        if fresh and not reseed:
            log.info("reusing the seeded data", **asdict(config))
            return False
        seed.seed(conn, config, reset=True, url=url, jobs=2)
    return True


def _migrated(conn: Conn) -> bool:
    row = conn.execute("SELECT to_regclass('imgmig.tenant_state') IS NOT NULL").fetchone()
    return bool(row and row[0])


class ApiServer:
    """The HTTP API on a free local port, in a thread (uvicorn, real HTTP)."""

    def __init__(self, url: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(url), host="127.0.0.1", port=self.port,
                                log_config=None, log_level="warning")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run(url: str, config: seed.SeedConfig, *, reseed: bool = False, say: Say = print) -> DemoResult:
    """The whole demo against ``url``; see the module docstring for the steps."""
    result = DemoResult(reseeded=prepare(url, config, reseed=reseed))
    migrate.upgrade(url)  # expand, so the API's key table and the stage rows exist
    with connect(url) as conn:
        tenants = [t for t in resolve(conn, None) if t != seed.TEMPLATE_TENANT]
        ledger = initial_ledger(conn, tenants)
        keys = {t: api_keys.create_key(conn, t, actor="demo") for t in tenants}
        # The restored pre-2026 backup: import its image_type evidence, then calibrate.
        calibration = label_heuristics.prepare(conn)
        conn.commit()
    say(f"label evidence imported and heuristics calibrated: {calibration is not None}")
    result.images_before = sum(len(e.urls) for e in ledger.entries.values())
    phase, stats = Phase(), result.stats
    common = {"url": url, "ledger": ledger, "phase": phase, "stats": stats}
    with ApiServer(url) as base, httpx.Client(base_url=base, timeout=30) as client:
        legacy = LegacyWriter(name_="legacy", seed=1, **common)  # type: ignore[arg-type]
        new_code: list[Writer] = [
            ServiceWriter(name_="service", seed=2, **common),  # type: ignore[arg-type]
            ApiWriter(name_="api", seed=3, client=client, keys=keys, **common),  # type: ignore[arg-type]
        ]
        for writer in (legacy, *new_code):
            writer.start()
        try:
            _migrate(url, phase, legacy, result, say)
        finally:
            for writer in (legacy, *new_code):
                writer.stop.set()
            for writer in (legacy, *new_code):
                writer.join(timeout=30)
    _check(url, result, ledger, tenants, say)
    return result


def _migrate(url: str, phase: Phase, legacy: LegacyWriter, result: DemoResult, say: Say) -> None:
    def on_step(tenant: str, step: deploy.Step) -> None:
        phase.set(step.value)
        say(f"  ✓ {tenant}: {step.value}")

    options = deploy.DeployOptions(
        canary=("user_5",), shadow_wait_s=60, contract_min_table_age_s=0,
        reason="imgmig demo",
    )  # fmt: skip
    phase.set("expand")
    say("deploy: expand → dual_write → backfill → verify → shadow_read → table")
    with contextlib.suppress(DeployStoppedError):  # stops before contract: expected
        deploy.run(url, None, options, on_step=on_step)
    say("retiring the legacy app instances (all tenants read the table)")
    legacy.stop.set()
    legacy.join(timeout=30)
    phase.set("contract")
    say("deploy: contract (archive, drop products.images)")
    confirmed = deploy.DeployOptions(**{**options.__dict__, "confirm_contract": True})
    deploy.run(url, None, confirmed, on_step=on_step)
    phase.set("downgrade")
    say(f"round trip: restoring downgrade of {INTERRUPTED}, killed before its last batch")
    _interrupted_round_trip(url, result, say)
    say("round trip: restoring downgrade (products.images rebuilt from product_images)")
    migrate.downgrade(url, migrate.EXPAND)
    phase.set("verify")
    _ = reconcile.run(url, None, mode="verify")
    phase.set("upgrade")
    say("round trip: contract again")
    migrate.upgrade(url, revision=migrate.CONTRACT, options={"contract_min_table_age": "0"})
    phase.set("after")


INTERRUPTED = "user_1"  # the tenant whose restore the demo kills
RESTORE_APP = "imgmig-restore-interrupted"


def _interrupted_round_trip(url: str, result: DemoResult, say: Say) -> None:
    """Kill one tenant's restore, press the kill switch, then finish the restore."""
    left = interrupt_restore(url, INTERRUPTED)
    if left is None:
        result.interrupted_restore = "finished before it could be killed"
        say(f"  {INTERRUPTED}: the restore {result.interrupted_restore}")
        return
    with connect(url) as conn:
        moves = cutover.kill_switch(conn, reason="imgmig demo: a restore was killed")
    [move] = [m for m in moves if m.tenant == INTERRUPTED]
    say(f"  {INTERRUPTED}: killed with {left} products not restored; kill switch: "
        f"{move.from_stage.value} -> {move.to_stage.value}")  # fmt: skip
    result.interrupted_restore = (
        f"{INTERRUPTED}: killed with {left} products left, kill switch kept it at "
        f"{move.to_stage.value}, deploy rollback finished it"
    )
    if move.to_stage is not Stage.TABLE:
        result.kill_switch_moved = move.to_stage.value
    deploy.rollback(url, [INTERRUPTED], reason="imgmig demo: finish the killed restore")


def interrupt_restore(
    url: str,
    tenant: str,
    *,
    batch_size: int = 100,
    at: Literal["last batch", "triggers"] = "last batch",
    timeout_s: float = 60,
) -> int | None:
    """Run ``imgmig migrate downgrade expand`` on ``tenant`` (at ``contract``) in a
    subprocess, and SIGKILL it where a crash would hurt, held there by a lock:

    * ``last batch``: before its last batch commits (a row lock on the tenant's last
      product, taken once the column is back); every batch before it has committed;
    * ``triggers``: while it installs the stage's triggers (the advisory lock their
      installer takes, taken before the downgrade starts), before any batch.

    Returns how many of the tenant's products still read ``[]``, or None if the downgrade
    finished before it could be held (a tenant of a few batches may be rebuilt before the
    row lock is taken).
    """
    dsn = psycopg.conninfo.make_conninfo(url, application_name=RESTORE_APP)
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", dsn,
           "migrate", "downgrade", migrate.EXPAND, "--tenant", tenant,
           "-x", f"restore_batch_size={batch_size}"]  # fmt: skip
    deadline = time.monotonic() + timeout_s
    with connect(url, autocommit=True) as watch, connect(url) as holder:
        if at == "triggers":
            holder.execute(
                "SELECT pg_advisory_xact_lock(hashtext('imgmig.install_log_function'), "
                "hashtext(%s))",
                (tenant,),
            )
        with subprocess.Popen(  # noqa: S603 - our own CLI, arguments built above
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as proc:
            try:
                if at == "last batch" and not _hold_last_product(watch, holder, tenant, proc):
                    return None
                if not _wait_blocked(watch, holder, proc, deadline):
                    return None
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                # Its backend still waits for the lock: end it before the lock goes.
                _end_backends(watch)
            finally:
                if proc.poll() is None:
                    proc.kill()
                holder.rollback()
        left = watch.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE images = '[]'").format(
                sql.Identifier(tenant, "products")
            )
        ).fetchone()
        return int(left[0]) if left else None


def _hold_last_product(
    watch: Conn, holder: Conn, tenant: str, proc: subprocess.Popen[bytes]
) -> bool:
    """Once the column is back, lock the tenant's last product; False if too late."""
    while not cutover.jsonb_column_exists(watch, tenant):
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    holder.execute("SET LOCAL lock_timeout = '5s'")
    try:
        holder.execute(
            sql.SQL("SELECT id FROM {} ORDER BY id DESC LIMIT 1 FOR UPDATE").format(
                sql.Identifier(tenant, "products")
            )
        )
    except psycopg.errors.LockNotAvailable:  # its last batch had it first
        return False
    return True


def _wait_blocked(
    watch: Conn, holder: Conn, proc: subprocess.Popen[bytes], deadline: float
) -> bool:
    """Wait until the downgrade's backend waits for ``holder``; False if it ended first."""
    query = (
        "SELECT count(*) > 0 FROM pg_stat_activity "
        "WHERE application_name = %s AND %s = ANY (pg_blocking_pids(pid))"
    )
    while True:
        row = watch.execute(query, (RESTORE_APP, holder.info.backend_pid)).fetchone()
        if row and row[0]:
            return True
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError("the downgrade neither finished nor waited for the lock")
        time.sleep(0.01)


def _end_backends(watch: Conn) -> None:
    watch.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (RESTORE_APP,),
    )
    gone = "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = %s"
    while not (row := watch.execute(gone, (RESTORE_APP,)).fetchone()) or not row[0]:
        time.sleep(0.01)


def _check(url: str, result: DemoResult, ledger: Ledger, tenants: list[str], say: Say) -> None:
    say("checking against the traffic ledger …")
    with connect(url) as conn:
        result.table = compare(conn, ledger, tenants, side="table")
        result.labels = label_metrics(conn, ledger, tenants)
        row = conn.execute(
            "SELECT coalesce(sum(drift_total), 0) FROM (SELECT DISTINCT ON (tenant) drift_total "
            "FROM imgmig.verify_runs ORDER BY tenant, id DESC) v"
        ).fetchone()
        result.drift = int(row[0]) if row else -1
    result.published = published_labels(url, ledger, tenants)
    result.longest_lock_wait_s = LOCK_WAITS.longest_s
    result.longest_lock_statement = LOCK_WAITS.statement
    result.failures = failures(result)


def failures(result: DemoResult) -> list[str]:
    """Why the demo fails; empty when every check holds."""
    out = []
    if not result.table.clean:
        out.append(f"table differs from the ledger: {result.table.examples[:2]}")
    if result.drift != 0:
        out.append(f"drift after the round trip: {result.drift}")
    if result.kill_switch_moved:
        out.append(
            f"the kill switch moved {INTERRUPTED} to {result.kill_switch_moved} while its "
            "JSONB was half restored"
        )
    if result.published.flagged_labels or result.published.real_labels:
        out.append(
            f"labels in marketplace payloads: {asdict(result.published)}; "
            f"detection misses: {list(result.labels.misses)}"
        )
    return out
