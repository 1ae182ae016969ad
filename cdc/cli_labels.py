"""CLI verbs for labels: evidence import, calibration, (re)deciding, the review queue.

Mounted by cdc.cli as ``imgmig labels …``. Exit codes: 0 done, 4 bad input (unknown
tenant or strategy, unreadable evidence or review file), 75 a tenant is busy (another
backfill or reconcile holds it), 3 other errors.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cdc import label_evidence, label_heuristics, label_report, label_review, labels, locks, stage
from cdc import tenants as tenants_mod
from cdc.cli_common import out, url
from cdc.db import Conn, connect
from cdc.stage import Stage

TenantOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--tenant", "-t", help="Limit to this tenant (repeatable; default: all)."),
]

labels_app = typer.Typer(help="Label evidence, detection and the review queue.")


@labels_app.command("import-legacy")
def import_legacy(
    csv_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--csv", help="CSV with tenant,product_id,url,image_type."),
    ] = None,
    schema: Annotated[str, typer.Option(help="Restored backup schema.")] = "legacy_backup",
    calibrate: Annotated[bool, typer.Option(help="Recalibrate the heuristics after.")] = True,
) -> None:
    """Import the legacy image_type into imgmig.label_evidence (idempotent)."""
    with connect(url(), autocommit=True) as conn:
        if csv_file is not None:
            result = label_evidence.import_csv(conn, csv_file)
        else:
            result = label_evidence.import_legacy(conn, schema=schema)
        out.print(f"read {result.read}, new {result.inserted}, changed {result.updated}")
        if calibrate:
            _calibrate(conn)


@labels_app.command("calibrate")
def calibrate() -> None:
    """Measure the heuristics' likelihood ratios on the products that have evidence."""
    with connect(url(), autocommit=True) as conn:
        _calibrate(conn)


def _calibrate(conn: Conn) -> None:
    cal = label_heuristics.calibrate(conn)
    state = "stored" if cal.stored else "too small a sample; defaults kept"
    out.print(f"calibration on {cal.labels} labels / {cal.photos} photos: {state}")
    if cal.stored:
        precision, recall = cal.checked
        out.print(
            f"two-fold check against the evidence: precision {precision:.3f}, recall {recall:.3f}"
        )


@labels_app.command("apply")
def apply(
    tenant: TenantOpt = None,
    strategy: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help=f"Strategies in order (default: {', '.join(labels.RECOMMENDED)})."),
    ] = None,
) -> None:
    """Decide the still-undecided products of backfilled tenants (e.g. after an import)."""
    strategies = labels.resolve(strategy or labels.RECOMMENDED)
    with connect(url(), autocommit=True) as conn:
        names = tenants_mod.resolve(conn, tenant)
        locks.lock_all(conn, names, "labels apply")
        for name in names:
            current = stage.get(conn, name).stage
            if current in (Stage.JSONB, Stage.CONTRACTED):
                # jsonb: nothing is backfilled yet; contracted: no JSONB to read evidence from.
                out.print(f"{name}: skipped at stage {current}")
                continue
            out.print(f"{name}: {labels.apply_tenant(conn, name, strategies)} labels set")


@labels_app.command("report")
def report(tenant: TenantOpt = None) -> None:
    """Products per strategy and confidence band, evidence, and the review queue."""
    with connect(url(), autocommit=True) as conn:
        rep = label_report.build(conn, tenant)
    table = Table("tenant", "strategy", "confidence", "labelled", "no label")
    for line in rep.lines:
        table.add_row(
            line.tenant, line.strategy, line.band, str(line.labelled), str(line.unlabelled)
        )
    out.print(table)
    evidence = ", ".join(f"{k} {v}" for k, v in sorted(rep.evidence.items())) or "none"
    out.print(
        f"labels: {rep.labelled()}; evidence rows: {evidence}; "
        f"calibrated: {'yes' if rep.calibrated else 'no (defaults)'}"
    )
    out.print(f"review queue: {rep.queue_open} open, {rep.queue_decided} decided")


@labels_app.command("export-review")
def export_review(
    file: Annotated[Path, typer.Argument(help="Output: .json, else CSV.")],
    tenant: TenantOpt = None,
) -> None:
    """Write the open review items; fill the decision column with label or none."""
    with connect(url(), autocommit=True) as conn:
        n = label_review.export(conn, file, tenant)
    out.print(f"{n} open items written to {file}")


@labels_app.command("apply-review")
def apply_review(
    file: Annotated[Path, typer.Argument(help="A filled-in export (.json or CSV).")],
    by: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Who decided (default: the OS user)."),
    ] = None,
) -> None:
    """Apply the decisions of a filled-in export, recording who and when."""
    with connect(url(), autocommit=True) as conn:
        result = label_review.apply_file(conn, file, by=by or getpass.getuser())
    out.print(f"{result.applied} decisions applied, {result.stale} stale (left alone)")


def register(app: typer.Typer) -> None:
    """Mount ``imgmig labels``."""
    app.add_typer(labels_app, name="labels")
