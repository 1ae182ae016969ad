"""CLI verbs for the cutover: ``flag get|set|kill-switch``, ``serve``, ``api-key create``.

Mounted on the main app by cdc.cli. One thin function per verb, each calling the library.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Annotated, Optional

import typer
from rich.table import Table

from cdc import cutover, project
from cdc import stage as stage_mod
from cdc import tenants as tenants_mod
from cdc.cli_common import out, url
from cdc.db import Conn, connect
from cdc.errors import KillSwitchIncompleteError, NoTenantChosenError

flag_app = typer.Typer(help="Read and set the per-tenant stage flag.")
key_app = typer.Typer(help="API keys for the HTTP API (one tenant per key).")

TenantOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--tenant", "-t", help="Limit to this tenant (repeatable)."),
]
ReasonOpt = Annotated[str, typer.Option(help="Why: goes to the audit log (required).")]


@flag_app.command("get")
def flag_get(tenant: TenantOpt = None) -> None:
    """Show each tenant's stage."""
    with connect(url()) as conn:
        names = tenants_mod.resolve(conn, tenant)  # a clear error for an unknown tenant
        states = stage_mod.get_all(conn, names)
        lags = {s.tenant: _lag(conn, s) for s in states}
    table = Table("tenant", "stage", "projection", "lag", "since", "by", "reason")
    for s in states:
        table.add_row(
            s.tenant,
            s.stage.value,
            s.projection,
            lags[s.tenant],
            f"{s.stage_changed_at:%Y-%m-%d %H:%M:%S}",
            s.changed_by or "",
            s.reason or "",
        )
    out.print(table)


def _lag(conn: Conn, state: stage_mod.TenantState) -> str:
    """Deferred and logical projection: events not applied yet, the age of the oldest, and
    for logical the WAL the capture slot has not read."""
    if state.projection == "inline":
        return "-"
    behind = project.lag(conn, state.tenant)
    wal = "" if behind.wal_bytes is None else f"; slot {behind.wal_bytes / 2**20:.1f} MiB behind"
    if not behind.pending or behind.oldest is None:
        return f"0 events{wal}"
    age = datetime.now(UTC) - behind.oldest
    return f"{behind.pending} events, oldest {age.total_seconds():.1f} s{wal}"


@flag_app.command("set")
def flag_set(
    stage: Annotated[str, typer.Argument(help="jsonb, dual_write, shadow_read, table, contracted")],
    reason: ReasonOpt,
    tenant: TenantOpt = None,
    all_tenants: Annotated[bool, typer.Option("--all", help="Every tenant.")] = False,
    force: Annotated[bool, typer.Option(help="Override the guards (audited).")] = False,
) -> None:
    """Move tenants to STAGE, guarded; all tenants move or none does."""
    target = stage_mod.Stage.parse(stage)
    if bool(tenant) == all_tenants:  # neither, or both
        raise NoTenantChosenError(action="flag set")
    with connect(url()) as conn:
        names = tenants_mod.resolve(conn, None if all_tenants else tenant)
        moves = cutover.change_stages(
            conn, names, target, reason=reason, actor=getpass.getuser(), force=force
        )
    for move in moves:
        forced = f" [red](forced past: {'; '.join(move.overridden)})[/]" if move.forced else ""
        out.print(f"{move.tenant}: {move.from_stage.value} -> {move.to_stage.value}{forced}")


@flag_app.command("kill-switch")
def flag_kill_switch(reason: ReasonOpt) -> None:
    """Send every tenant back to the safest stage that still has all the data."""
    with connect(url()) as conn:
        moves = cutover.kill_switch(conn, reason=reason, actor=getpass.getuser())
    for move in moves:
        if move.error:
            out.print(f"[red]{move.tenant}: {move.from_stage.value} NOT MOVED: {move.error}[/]")
        elif move.from_stage == move.to_stage:
            out.print(f"{move.tenant}: {move.from_stage.value} ({move.note})")
        else:
            out.print(f"{move.tenant}: {move.from_stage.value} -> {move.to_stage.value}")
    failed = tuple(m.tenant for m in moves if m.error)
    if failed:
        raise KillSwitchIncompleteError(tenants=failed)


@key_app.command("create")
def api_key_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The key's tenant.")],
) -> None:
    """Create an API key for one tenant; it is printed once and stored hashed."""
    from services import api_keys

    with connect(url()) as conn:
        (name,) = tenants_mod.resolve(conn, [tenant])
        key = api_keys.create_key(conn, name, actor=getpass.getuser())
    out.print(key, highlight=False, soft_wrap=True)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Serve the product-images HTTP API (OpenAPI at /docs) with uvicorn."""
    import uvicorn

    from services.api import create_app

    uvicorn.run(create_app(url()), host=host, port=port, log_config=None)


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
    app.add_typer(flag_app, name="flag")
    app.add_typer(key_app, name="api-key")
    app.command("serve")(serve)
