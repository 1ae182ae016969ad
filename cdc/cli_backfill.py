"""CLI verbs for backfill, verify and reconcile; mounted on the main app by cdc.cli.

Exit codes (also in each run's final JSON log line):

* backfill: 0 every tenant done, 3 a tenant failed;
* verify: 0 clean, 2 drift found, 3 error;
* reconcile: 0 clean, 1 drift found and repaired, 2 drift left, 3 error;
* any of them: 75 another run holds a tenant (the run exits at once), 4 bad input
  (unknown tenant, unknown label strategy), 7 stage refused.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import structlog
import typer
from rich.table import Table

from cdc import backfill as backfill_mod
from cdc import checkpoint, fkcheck, labels, metrics, replicas, runs
from cdc import progress as progress_mod
from cdc import reconcile as reconcile_mod
from cdc.cli_common import (
    MaxReplicaLagOpt,
    ReplicaLagIgnoreOpt,
    out,
    url,
)
from cdc.db import connect
from cdc.errors import ConflictingOptionsError, ImgmigError
from cdc.pacing import DEFAULT_TARGET_MS, BatchSizer

log = structlog.get_logger("cdc.cli")

TenantOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--tenant", "-t", help="Limit to this tenant (repeatable)."),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every tenant.")]

backfill_app = typer.Typer(
    help="Migrate history: `imgmig backfill --all`, or pause/resume running backfills.",
    invoke_without_command=True,
)


def chosen(tenant: list[str] | None, all_: bool, action: str) -> list[str] | None:
    """``--tenant`` names; ``None`` (every eligible tenant) for ``--all`` or neither.

    DESIGN.md's contract is ``[--tenant T | --all]``: both optional, exclusive.
    """
    if tenant and all_:
        raise ConflictingOptionsError(action=action, options=("--tenant", "--all"))
    return tenant or None


@backfill_app.callback()
def backfill(  # noqa: PLR0917 - Typer derives options from parameters
    ctx: typer.Context,
    tenant: TenantOpt = None,
    all_: AllOpt = False,
    batch_size: Annotated[int, typer.Option(min=1, help="First batch size.")] = 500,
    max_rate: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=1, help="At most this many image rows/s per tenant."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Tenants in parallel.")] = 2,
    target_ms: Annotated[
        int, typer.Option(min=10, help="Target batch duration (how long its row locks last).")
    ] = DEFAULT_TARGET_MS,
    label_strategy: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help=f"Label strategies in order, repeatable ({', '.join(labels.known())}; "
            f"default: {', '.join(labels.DEFAULT)})."
        ),
    ] = None,
    restart: Annotated[bool, typer.Option(help="Start done tenants over.")] = False,
    max_replica_lag: MaxReplicaLagOpt = replicas.DEFAULT_MAX_LAG,
    replica_lag_ignore: ReplicaLagIgnoreOpt = None,
    fk_check: Annotated[
        str,
        typer.Option(
            help="auto: a batch skips PostgreSQL's product_id foreign-key check, which its "
            "own row locks prove, where the role may set session_replication_role and no "
            "other trigger would be skipped; always: keep the check."
        ),
    ] = "auto",
) -> None:
    """Backfill product_images from JSONB, resumable (kill -9 safe), tenants in parallel."""
    if ctx.invoked_subcommand is not None:
        return
    if fk_check not in fkcheck.MODES:
        raise typer.BadParameter(f"must be one of {', '.join(fkcheck.MODES)}",
                                 param_hint="--fk-check")  # fmt: skip
    config = backfill_mod.BackfillConfig(
        batch_size=batch_size,
        sizer=BatchSizer(target_s=target_ms / 1000),
        max_rate=max_rate,
        workers=workers,
        label_strategies=tuple(label_strategy) if label_strategy else labels.DEFAULT,
        restart=restart,
        max_replica_lag=max_replica_lag or None,
        replica_lag_ignore=tuple(replica_lag_ignore or ()),
        fk_check=fk_check,
    )
    wanted = chosen(tenant, all_, "backfill")
    if sys.stderr.isatty():
        with progress_mod.bars(out) as bars:
            results = backfill_mod.run(url(), wanted, config, bars)
    else:
        results = backfill_mod.run(url(), wanted, config, progress_mod.LogLines())
    failed = [r for r in results if r.status != "done"]
    code = 3 if failed else 0
    log.info(
        "backfill run finished",
        exit_code=code,
        tenants=len(results),
        failed=[r.tenant for r in failed],
        products=sum(r.products for r in results),
        rows=sum(r.rows for r in results),
        replica_wait_s=round(sum(r.replica_wait_s for r in results), 1),
        fk_check_skipped_batches=sum(r.fk_check_skipped for r in results),
    )
    raise typer.Exit(code)


@backfill_app.command("pause")
def backfill_pause() -> None:
    """Running backfills stop after their current batch and wait."""
    backfill_mod.pause(url())
    out.print("backfill paused")


@backfill_app.command("resume")
def backfill_resume() -> None:
    """Let paused backfills go on."""
    backfill_mod.resume(url())
    out.print("backfill resumed")


@backfill_app.command("status")
def backfill_status() -> None:
    """Each tenant's checkpoint, and whether backfills are paused."""
    with connect(url(), autocommit=True) as conn:
        states = checkpoint.read_all(conn)
        paused = checkpoint.paused(conn)
        lag, unseen = replicas.furthest(conn), replicas.unseen(conn)
    table = Table("tenant", "status", "last id", "max id", "products", "rows", "batch")
    for cp in states:
        table.add_row(
            cp.tenant, cp.status, str(cp.last_id), str(cp.max_id or "-"),
            f"{cp.products_done:,}", f"{cp.rows_done:,}", str(cp.batch_size or "-"),
        )  # fmt: skip
    out.print(table)
    out.print("backfill is [bold]paused[/]" if paused else "backfill is not paused")
    if lag is not None:
        out.print(f"replication: {lag} (a backfill waits above --max-replica-lag)")
    elif unseen:
        out.print(f"replication: {unseen} WAL consumer(s) this role cannot see "
                  "(grant pg_read_all_stats)")  # fmt: skip
    else:
        out.print("replication: no standby or logical consumer connected")


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
    app.add_typer(backfill_app, name="backfill")
    app.command()(verify)
    app.command()(reconcile)


def _cron_run(
    mode: str, wanted: list[str] | None, *, repair: bool, metrics_file: Path | None
) -> None:
    """Run verify or reconcile; end with one log line and the exit code it names."""
    started = time.monotonic()
    outcomes: list[reconcile_mod.Outcome] = []
    error: Exception | None = None
    try:
        outcomes = reconcile_mod.run(url(), wanted, mode=mode, do_repair=repair)
        code = reconcile_mod.overall_exit_code(outcomes)
    except ImgmigError as exc:
        error, code = exc, exc.exit_code
    except Exception as exc:  # a bug must not exit 1, which cron reads as "repaired"
        error, code = exc, runs.ERROR
    duration = time.monotonic() - started
    if metrics_file is not None:
        metrics.write(metrics_file, outcomes, mode=mode, exit_code=code, duration_s=duration)
    emit = log.info if code in (0, 1) else log.warning if code == runs.DRIFT_LEFT else log.error
    emit(
        f"{mode} finished",
        exit_code=code,
        tenants=len(outcomes),
        drift_total=sum(o.report.drift_total for o in outcomes),
        repaired=sum(o.repaired for o in outcomes),
        left_over=sum(o.left_over for o in outcomes),
        error=None if error is None else str(error).strip(),
        duration_s=round(duration, 3),
    )
    if isinstance(error, ImgmigError):
        raise error
    if error is not None:
        if "--debug" in sys.argv:
            raise error
        detail = str(error).strip() or type(error).__name__
        print(f"imgmig: error: {detail}", file=sys.stderr)
    raise typer.Exit(code)


MetricsOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(help="Write Prometheus textfile metrics here (atomically)."),
]


def verify(tenant: TenantOpt = None, all_: AllOpt = False, metrics_file: MetricsOpt = None) -> None:
    """Read-only: compare both sides per product. Exit 0 only with zero drift (2: drift)."""
    _cron_run("verify", chosen(tenant, all_, "verify"), repair=False, metrics_file=metrics_file)


def reconcile(
    tenant: TenantOpt = None,
    all_: AllOpt = False,
    repair: Annotated[bool, typer.Option(help="Repair drift from the source of truth.")] = True,
    metrics_file: MetricsOpt = None,
) -> None:
    """The cron entry point: verify, repair, record. Exit 0 clean, 1 repaired, 2 left, 3 error,
    75 another run holds a tenant."""
    wanted = chosen(tenant, all_, "reconcile")
    _cron_run("reconcile", wanted, repair=repair, metrics_file=metrics_file)
