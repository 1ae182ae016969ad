"""Prometheus textfile metrics for verify and reconcile runs (node_exporter's collector).

``write`` renders a private registry and renames it into place atomically, so the
collector never reads a half-written file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from cdc.reconcile import Outcome
from cdc.verify import CLASSES, MALFORMED


def registry_for(
    outcomes: Sequence[Outcome], *, mode: str, exit_code: int, duration_s: float
) -> CollectorRegistry:
    registry = CollectorRegistry()
    drift = Gauge(
        "imgmig_drift_products",
        "Products with drift, per class, found by the last run.",
        ["mode", "tenant", "class"],
        registry=registry,
    )
    checked = Gauge(
        "imgmig_products_checked", "Products compared.", ["mode", "tenant"], registry=registry
    )
    repaired = Gauge(
        "imgmig_repaired_products", "Drifted products repaired.", ["mode", "tenant"],
        registry=registry,
    )  # fmt: skip
    left = Gauge(
        "imgmig_left_over_products", "Drifted products left.", ["mode", "tenant"],
        registry=registry,
    )  # fmt: skip
    for o in outcomes:
        tenant = o.report.tenant
        for name in (*CLASSES, MALFORMED):
            drift.labels(mode, tenant, name).set(o.report.drift.get(name, 0))
        checked.labels(mode, tenant).set(o.report.products_checked)
        repaired.labels(mode, tenant).set(o.repaired)
        left.labels(mode, tenant).set(o.left_over)
    Gauge("imgmig_run_exit_code", "Exit code of the last run.", ["mode"], registry=registry).labels(
        mode
    ).set(exit_code)
    Gauge(
        "imgmig_run_duration_seconds", "Duration of the last run.", ["mode"], registry=registry
    ).labels(mode).set(duration_s)
    Gauge(
        "imgmig_run_finished_timestamp_seconds",
        "When the last run finished (alert when it is stale).",
        ["mode"],
        registry=registry,
    ).labels(mode).set(time.time())
    return registry


def write(
    path: Path, outcomes: Sequence[Outcome], *, mode: str, exit_code: int, duration_s: float
) -> None:
    registry = registry_for(outcomes, mode=mode, exit_code=exit_code, duration_s=duration_s)
    write_to_textfile(str(path), registry)
