"""``imgmig``: one thin function per verb, each calling the library.

Known errors become one line on stderr and a documented exit code; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from cdc import migrate as migrate_mod
from cdc import seed as seed_mod
from cdc import status as status_mod
from cdc.cli_common import Settings, out, url
from cdc.db import connect
from cdc.errors import ImgmigError
from cdc.logs import LogFormat, configure

if TYPE_CHECKING:
    from cdc.demo import DemoResult

app = typer.Typer(
    name="imgmig",
    help="Zero-downtime migration of product images from JSONB to a table.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
migrate_app = typer.Typer(help="Run the Alembic revisions on every tenant (or some).")
app.add_typer(migrate_app, name="migrate")

TenantOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--tenant", "-t", help="Limit to this tenant (repeatable)."),
]


@app.callback()
def main_options(
    database_url: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="DATABASE_URL", help="PostgreSQL URL (default: embedded server)."),
    ] = None,
    log_format: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="console or json (default: console on a terminal)."),
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Options every command takes."""
    if log_format not in (None, "console", "json"):
        raise typer.BadParameter("must be console or json", param_hint="--log-format")
    fmt: LogFormat | None = log_format  # type: ignore[assignment]
    configure(fmt)
    Settings.database_url = database_url


@app.command()
def seed(
    tenants: int = 4,
    products: int = 3282,
    labels: int = 611,
    mess_share: float = 0.02,
    seed: int = 42,
    reset: Annotated[bool, typer.Option(help="Drop existing tenant schemas first.")] = False,
    jobs: Annotated[int, typer.Option(help="Tenants filled in parallel.")] = 2,
) -> None:
    """Create deterministic StoFlow-like tenants with a known label truth."""
    try:
        config = seed_mod.SeedConfig(
            tenants=tenants, products=products, labels=labels, mess_share=mess_share, seed=seed
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    started = time.monotonic()
    target = url()
    with connect(target) as conn:
        counts = seed_mod.seed(conn, config, reset=reset, url=target, jobs=jobs)
    took = time.monotonic() - started
    out.print(f"seeded {sum(counts.values())} products in {len(counts)} tenants in {took:.1f} s")


XOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option(
        "-x",
        help="NAME=VALUE for the revisions, as `alembic -x` (lock_timeout_ms, ddl_attempts, "
        "contract_min_table_age, restore_batch_size).",
    ),
]


#: The revisions' -x options, each with its type (all must be positive but the age).
X_OPTIONS = {
    "lock_timeout_ms": int,
    "ddl_attempts": int,
    "contract_min_table_age": float,
    "restore_batch_size": int,
}


def _x_options(given: list[str] | None) -> dict[str, str]:
    pairs = {}
    for item in given or []:
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in X_OPTIONS:
            raise typer.BadParameter(
                f"{item!r}: expected NAME=VALUE, NAME one of {', '.join(X_OPTIONS)}",
                param_hint="-x",
            )
        try:
            number = X_OPTIONS[name](value)
        except ValueError:
            number = -1
        if number < 0 or (number == 0 and name != "contract_min_table_age"):
            raise typer.BadParameter(
                f"{name} must be a positive number, not {value!r}", param_hint="-x"
            )
        pairs[name] = value
    return pairs


@migrate_app.command("upgrade")
def migrate_upgrade(
    tenant: TenantOpt = None, revision: str = migrate_mod.EXPAND, x: XOpt = None
) -> None:
    """alembic upgrade, per tenant (to `expand` unless told otherwise)."""
    migrate_mod.upgrade(url(), tenants=tenant, revision=revision, options=_x_options(x))


@migrate_app.command("downgrade")
def migrate_downgrade(revision: str, tenant: TenantOpt = None, x: XOpt = None) -> None:
    """alembic downgrade, per tenant."""
    migrate_mod.downgrade(url(), revision, tenants=tenant, options=_x_options(x))


@app.command()
def status(tenant: TenantOpt = None) -> None:
    """Tenants, products, images on both sides, and stages."""
    with connect(url()) as conn:
        print_summaries(status_mod.summarize(conn, tenant))


@app.command()
def demo(
    products: int = 3282,
    labels: int = 611,
    seed: int = 42,
    reseed: Annotated[bool, typer.Option(help="Reseed even if the same data is there.")] = False,
) -> None:
    """The main job: the whole migration under live traffic, then a report."""
    from cdc import demo as demo_mod  # heavy (the API server, the services): load on use

    config = seed_mod.SeedConfig(products=products, labels=labels, seed=seed)
    explicit = Settings.database_url if "DATABASE_URL" not in os.environ else None
    started = time.monotonic()
    with demo_mod.demo_server(explicit) as server:
        out.print(f"[bold]imgmig demo[/] on {server.kind} PostgreSQL, {products} products")
        result = demo_mod.run(server.url, config, reseed=reseed, say=out.print)
        with connect(server.url) as conn:
            print_summaries(status_mod.summarize(conn))
    print_report(result, time.monotonic() - started)
    if not result.ok:
        for failure in result.failures:
            out.print(f"[red]FAIL[/] {failure}")
        raise typer.Exit(2)
    out.print("[green]demo passed[/]: zero loss, zero drift, zero labels published")


def print_report(result: DemoResult, seconds: float) -> None:
    """The demo's report, one row per check."""
    from cdc.demo_report import latency_rows

    t, p, lab = result.table, result.published, result.labels
    table = Table("check", "result", title=f"imgmig demo report ({seconds:.0f} s)")
    table.add_row("images before (seed)", f"{result.images_before:,}")
    table.add_row("images after (ledger expects / table holds)",
                  f"{t.expected_images:,} / {t.found_images:,}")  # fmt: skip
    table.add_row(
        "lost / duplicate / misordered images", f"{t.lost} / {t.duplicate} / {t.misordered}"
    )
    table.add_row("deleted products still holding images", str(t.ghost_products))
    table.add_row("drift after the round trip (verify)", str(result.drift))
    table.add_row("restore killed halfway", result.interrupted_restore)
    table.add_row("marketplace payloads built", f"{p.payloads:,}")
    table.add_row("flagged labels in payloads / real labels in payloads",
                  f"{p.flagged_labels} / {p.real_labels}")  # fmt: skip
    table.add_row("label precision / recall (vs seed truth)",
                  f"{lab.precision:.3f} / {lab.recall:.3f} (tp {lab.true_positive}, "
                  f"fp {lab.false_positive}, fn {lab.false_negative})")  # fmt: skip
    wait_ms = result.longest_lock_wait_s * 1000
    table.add_row(
        "longest DDL lock wait", f"{wait_ms:.0f} ms ({result.longest_lock_statement[:50]})"
    )
    table.add_row("traffic writes ok / failed", f"{result.stats.ok:,} / {result.stats.failed:,}")
    out.print(table)
    latency = Table("phase", "writes", "p50 ms", "p99 ms", title="write latency per phase")
    for phase, n, p50, p99 in latency_rows(result.stats):
        latency.add_row(phase, str(n), f"{p50:.1f}", f"{p99:.1f}")
    out.print(latency)


def print_summaries(summaries: list[status_mod.TenantSummary]) -> None:
    table = Table("tenant", "products", "images (jsonb)", "images (table)", "stage")
    for s in summaries:
        table.add_row(s.tenant, str(s.products), _n(s.jsonb_images), _n(s.table_images), s.stage)
    table.add_section()
    table.add_row(
        "total",
        str(sum(s.products for s in summaries)),
        _n(sum(s.jsonb_images or 0 for s in summaries)),
        _n(sum(s.table_images or 0 for s in summaries)),
        "",
    )
    out.print(table)


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _mount_areas() -> None:
    """Each area (capture, backfill, cutover, deploy) owns its verbs in its own module."""
    from cdc import cli_backfill, cli_capture, cli_cutover, cli_deploy, cli_labels

    for area in (cli_capture, cli_backfill, cli_cutover, cli_deploy, cli_labels):
        area.register(app)


_mount_areas()


#: A command-line usage error (unknown option, bad value) exits 64, EX_USAGE of sysexits.h,
#: not Click's 2: verify and reconcile use 2 for "drift left", and a cron job must not
#: mistake a broken command line for drift. Click reads the code from the exception
#: class; Typer ships its own copy of Click, so both classes get it (tests/test_cli.py
#: fails if a Typer upgrade moves it).
USAGE_EXIT_CODE = 64
for _module in ("click.exceptions", "typer._click.exceptions"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_module).UsageError.exit_code = USAGE_EXIT_CODE


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ImgmigError as exc:
        if "--debug" in sys.argv:
            raise
        print(f"imgmig: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
