"""Shared helpers for the label tests (not a test module); only tests read seed_truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc import backfill, label_evidence, label_heuristics
from cdc.db import Query
from cdc.progress import Silent
from tests.backfill_helpers import TENANTS, set_stage

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Score:
    """Labels found against the seed's truth."""

    labelled: int
    correct: int
    truth: int

    @property
    def precision(self) -> float:
        return self.correct / self.labelled if self.labelled else 1.0

    @property
    def recall(self) -> float:
        return self.correct / self.truth if self.truth else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def run_backfill(url: str, *strategies: str, evidence: bool = False) -> None:
    """Import (and calibrate on) the legacy evidence if asked, then backfill every tenant."""
    if evidence:
        with psycopg.connect(url, autocommit=True) as conn:
            label_evidence.import_legacy(conn)
            assert label_heuristics.calibrate(conn).stored
    set_stage(url, "dual_write")
    config = backfill.BackfillConfig(batch_size=40, label_strategies=("explicit", *strategies))
    assert all(r.status == "done" for r in backfill.run(url, list(TENANTS), config, Silent()))


_LABELLED = "SELECT count(*) FROM {} WHERE is_label"
_CORRECT = """
SELECT count(*) FROM {} r JOIN seed_truth.labels s
    ON s.tenant = %s AND s.product_id = r.product_id AND s.url = r.url
 WHERE r.is_label
"""


def score(conn: Conn) -> Score:
    """Precision and recall of the current labels over every tenant."""
    labelled = correct = 0
    for tenant in TENANTS:
        images = sql.Identifier(tenant, "product_images")
        labelled += _one(conn, sql.SQL(_LABELLED).format(images), ())
        correct += _one(conn, sql.SQL(_CORRECT).format(images), (tenant,))
    truth = _one(conn, sql.SQL("SELECT count(*) FROM seed_truth.labels"), ())
    return Score(labelled=labelled, correct=correct, truth=truth)


def _one(conn: Conn, query: Query, args: tuple[object, ...]) -> int:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return int(row[0])


def max_labels_per_product(conn: Conn) -> int:
    worst = 0
    for tenant in TENANTS:
        query = sql.SQL(
            "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM {} WHERE is_label"
            " GROUP BY product_id) c"
        ).format(sql.Identifier(tenant, "product_images"))
        worst = max(worst, _one(conn, query, ()))
    return worst
