"""One row per verify or reconcile run in ``imgmig.verify_runs``.

The cutover guards read the latest row with ``drift_total = 0`` and ``finished_at`` set,
so a run that fails is recorded with ``exit_code = 3`` and ``finished_at`` left NULL: it
can never pass for a clean verify.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql
from psycopg.types.json import Jsonb

from cdc.db import Conn
from cdc.tenants import CONTROL_SCHEMA
from cdc.verify import Report

RUNS: Final = sql.Identifier(CONTROL_SCHEMA, "verify_runs")

CLEAN: Final = 0
REPAIRED: Final = 1
DRIFT_LEFT: Final = 2
ERROR: Final = 3
#: A tenant another run held, skipped (EX_TEMPFAIL, as ``TenantBusyError``).
BUSY: Final = 75


def exit_code(report: Report, *, left_over: int, repaired: int) -> int:
    """0 clean, 1 drift found and all repaired, 2 drift left."""
    if report.drift_total == 0:
        return CLEAN
    return DRIFT_LEFT if left_over or not repaired else REPAIRED


def start(conn: Conn, tenant: str, mode: str, stage: str) -> int:
    row = conn.execute(
        sql.SQL("INSERT INTO {} (tenant, mode, stage) VALUES (%s, %s, %s) RETURNING id").format(
            RUNS
        ),
        (tenant, mode, stage),
    ).fetchone()
    assert row is not None
    return int(row[0])


def finish(conn: Conn, run_id: int, report: Report, *, repaired: int, left_over: int) -> int:
    """Record the outcome; return the run's exit code."""
    code = exit_code(report, left_over=left_over, repaired=repaired)
    conn.execute(
        sql.SQL(
            "UPDATE {} SET finished_at = now(), products_checked = %s, drift = %s, "
            "drift_total = %s, repaired = %s, left_over = %s, exit_code = %s WHERE id = %s"
        ).format(RUNS),
        (
            report.products_checked,
            Jsonb(report.drift),
            report.drift_total,
            repaired,
            left_over,
            code,
            run_id,
        ),
    )
    return code


def fail(conn: Conn, run_id: int) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET exit_code = %s WHERE id = %s").format(RUNS), (ERROR, run_id)
    )
