"""What label detection decided: products per strategy and confidence band, the queue.

A product's decision is its label row's strategy and confidence when it has a label,
else the strategy its rows carry ("no label" decisions), else ``undecided``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, LiteralString

from psycopg import sql

from cdc import label_store
from cdc.db import Conn
from cdc.tenants import resolve

BANDS: Final = (">= 0.99", "0.90-0.99", "0.50-0.90", "< 0.50", "-")

_PER_PRODUCT: LiteralString = """
WITH per AS (
    SELECT r.product_id, bool_or(r.is_label) AS labelled,
           coalesce(max(r.label_strategy) FILTER (WHERE r.is_label), max(r.label_strategy))
             AS strategy,
           coalesce(max(r.label_confidence) FILTER (WHERE r.is_label), max(r.label_confidence))
             AS confidence
      FROM {images} r GROUP BY r.product_id
)
SELECT coalesce(strategy, 'undecided'),
       CASE WHEN confidence IS NULL THEN '-'
            WHEN confidence >= 0.99 THEN '>= 0.99'
            WHEN confidence >= 0.9 THEN '0.90-0.99'
            WHEN confidence >= 0.5 THEN '0.50-0.90'
            ELSE '< 0.50' END,
       count(*) FILTER (WHERE labelled), count(*) FILTER (WHERE NOT labelled)
  FROM per GROUP BY 1, 2 ORDER BY 1, 2
"""


@dataclass(frozen=True)
class Line:
    """Products of one tenant decided by one strategy within one confidence band."""

    tenant: str
    strategy: str
    band: str
    labelled: int
    unlabelled: int


@dataclass(frozen=True)
class Report:
    lines: list[Line]
    queue_open: int
    queue_decided: int
    evidence: dict[str, int]
    calibrated: bool

    def labelled(self) -> int:
        return sum(line.labelled for line in self.lines)


def build(conn: Conn, tenants: Sequence[str] | None = None) -> Report:
    """The report for ``tenants`` (default: all) that have a ``product_images`` table."""
    label_store.ensure(conn)
    lines: list[Line] = []
    chosen = resolve(conn, tenants)
    for tenant in chosen:
        if not _has_table(conn, tenant):
            continue
        query = sql.SQL(_PER_PRODUCT).format(images=sql.Identifier(tenant, "product_images"))
        for strategy, band, yes, no in conn.execute(query).fetchall():
            lines.append(Line(tenant, str(strategy), str(band), int(yes), int(no)))
    queue = conn.execute(
        "SELECT count(*) FILTER (WHERE decided_at IS NULL), count(*) FILTER (WHERE decided_at"
        " IS NOT NULL) FROM imgmig.label_review WHERE tenant = ANY (%s)",
        (chosen,),
    ).fetchone()
    evidence = conn.execute("SELECT image_type, count(*) FROM imgmig.label_evidence GROUP BY 1")
    calibrated = conn.execute("SELECT count(*) > 0 FROM imgmig.label_calibration").fetchone()
    return Report(
        lines=lines,
        queue_open=int(queue[0]) if queue else 0,
        queue_decided=int(queue[1]) if queue else 0,
        evidence={str(k): int(n) for k, n in evidence.fetchall()},
        calibrated=bool(calibrated and calibrated[0]),
    )


def _has_table(conn: Conn, tenant: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, 'product_images')) IS NOT NULL",
        (tenant,),
    ).fetchone()
    return bool(row and row[0])
