"""CLI verbs for change capture: ``project`` and ``replay``; mounted by cdc.cli."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cdc import capture, events, logical, project
from cdc import tenants as tenants_mod
from cdc.cli_common import out, url
from cdc.db import connect

TenantsOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--tenant", "-t", help="Limit to this tenant (repeatable)."),
]


def project_cmd(
    tenant: TenantsOpt = None,
    all_tenants: Annotated[bool, typer.Option("--all", help="Every tenant.")] = False,
    mode: Annotated[
        Optional[str],  # noqa: UP045 - Typer needs Optional here
        typer.Option(
            help="First switch projection to inline, deferred (a trigger logs each write) "
            "or logical (the WAL does: needs wal_level=logical)."
        ),
    ] = None,
) -> None:
    """Apply pending capture events to product_images (the deferred projector)."""
    if not tenant and not all_tenants:
        raise typer.BadParameter("name a --tenant or pass --all")
    if mode not in (None, *capture.PROJECTIONS):
        raise typer.BadParameter(
            f"must be one of {', '.join(capture.PROJECTIONS)}", param_hint="--mode"
        )
    with connect(url(), autocommit=True) as conn:
        names = tenants_mod.resolve(conn, None if all_tenants else tenant)
        had_slot = logical.slot_exists(conn)
        if mode is not None:
            for name in names:
                project.switch(conn, name, mode)
        logical.drain(conn)  # once: the slot holds every logical tenant's writes
        for name in names:
            applied = project.project(conn, name, drain=False)
            behind = project.lag(conn, name)
            wal = "" if behind.wal_bytes is None else f", slot {_size(behind.wal_bytes)} behind"
            out.print(f"{name}: {applied} products projected, {behind.pending} events pending{wal}")
        if had_slot != logical.slot_exists(conn):
            done = "created" if not had_slot else "dropped (no tenant uses it)"
            out.print(f"capture slot {logical.slot_name(conn)} {done}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} B"


def replay_cmd(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant to rebuild.")],
) -> None:
    """Rebuild a tenant's product_images from its event log."""
    with connect(url()) as conn:
        (name,) = tenants_mod.resolve(conn, [tenant])
        with conn.transaction():
            count = events.replay(conn, name)
    out.print(f"{name}: product_images rebuilt from events for {count} products")


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
    app.command("project")(project_cmd)
    app.command("replay")(replay_cmd)
