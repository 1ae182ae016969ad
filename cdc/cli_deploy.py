"""CLI verbs for the deploy sequence and the contract archive."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Optional

import typer
from rich.table import Table

from cdc import contract, deploy, replicas
from cdc.cli_common import (
    MaxReplicaLagOpt,
    ReplicaLagIgnoreOpt,
    out,
    url,
)
from cdc.db import connect
from cdc.stage import Stage
from cdc.tenants import resolve

TenantOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--tenant", "-t", help="Limit to this tenant (repeatable)."),
]


def register(app: typer.Typer) -> None:
    """Add ``deploy`` and ``archive`` to ``app``."""
    deploy_app = typer.Typer(help="The zero-downtime sequence, per tenant, resumable.")
    deploy_app.command("plan")(plan)
    deploy_app.command("run")(run)
    deploy_app.command("status")(status)
    deploy_app.command("rollback")(rollback)
    archive_app = typer.Typer(help="The JSONB archive the contract step keeps.")
    archive_app.command("restore")(archive_restore)
    app.add_typer(deploy_app, name="deploy")
    app.add_typer(archive_app, name="archive")


def plan(tenant: TenantOpt = None) -> None:
    """Show the steps each tenant still has to go through."""
    with connect(url()) as conn:
        steps = deploy.plan(conn, tenant)
    table = Table("tenant", "steps to run")
    for name, todo in steps.items():
        table.add_row(name, " → ".join(s.value for s in todo) or "done")
    out.print(table)


def run(
    tenant: TenantOpt = None,
    canary: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="Tenants that reach `table` before the others (repeatable)."),
    ] = None,
    confirm_contract: Annotated[
        bool, typer.Option(help="Allow the contract step (drops products.images).")
    ] = False,
    shadow_wait: Annotated[float, typer.Option(help="Seconds to wait for shadow reads.")] = 60,
    contract_min_table_age: Annotated[
        float, typer.Option(help="Seconds a tenant must have been at `table`.")
    ] = 3600,
    reason: str = "imgmig deploy",
    max_replica_lag: MaxReplicaLagOpt = replicas.DEFAULT_MAX_LAG,
    replica_lag_ignore: ReplicaLagIgnoreOpt = None,
) -> None:
    """Run (or resume) the sequence: expand → … → table → contract."""
    target = url()
    defaults = deploy.DeployOptions()
    options = deploy.DeployOptions(
        canary=tuple(canary or ()),
        confirm_contract=confirm_contract,
        shadow_wait_s=shadow_wait,
        contract_min_table_age_s=contract_min_table_age,
        reason=reason,
        backfill=replace(
            defaults.backfill,
            max_replica_lag=max_replica_lag or None,
            replica_lag_ignore=tuple(replica_lag_ignore or ()),
        ),
    )
    with connect(target) as conn:
        resolve(conn, tenant)  # unknown tenants fail before anything runs
    left = deploy.run(target, tenant, options, on_step=_print_step)
    out.print({t: (s.value if s else "done") for t, s in left.items()})


def _print_step(tenant: str, step: deploy.Step) -> None:
    out.print(f"[green]✓[/] {tenant}: {step.value}")


def status(tenant: TenantOpt = None) -> None:
    """Stage, next step, backfill, last verify and shadow counters per tenant."""
    with connect(url()) as conn:
        rows = deploy.status(conn, tenant)
    table = Table("tenant", "stage", "next", "backfill", "last verify", "shadow")
    for r in rows:
        table.add_row(r.tenant, r.stage, r.next_step, r.backfill, r.last_verify, r.shadow)
    out.print(table)


def rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit).")],
    tenant: TenantOpt = None,
    to: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Step back until this stage (default: one step)."),
    ] = None,
) -> None:
    """Go back one safe step (or down to --to), per tenant."""
    target = Stage.parse(to) if to else None
    stages = deploy.rollback(url(), tenant, to=target, reason=reason)
    out.print({t: s.value for t, s in stages.items()})


def archive_restore(
    tenant: Annotated[list[str], typer.Option("--tenant", "-t")],
    include_changed: Annotated[
        bool,
        typer.Option(
            help="Also put the archived images back over products changed since the "
            "contract, reverting those changes (the event log keeps them)."
        ),
    ] = False,
) -> None:
    """Write the archived JSONB back where it holds the same images as the rows."""
    with connect(url()) as conn:
        for name in resolve(conn, tenant):
            restored, changed = contract.restore_archive(
                conn, name, include_changed=include_changed
            )
            conn.commit()
            line = f"{name}: restored {restored} products from the archive"
            if changed and not include_changed:
                line += (
                    f"; {changed} changed since the contract, left alone "
                    "(--include-changed reverts them)"
                )
            out.print(line)
