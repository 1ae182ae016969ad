"""The numbers in docs/labels.md: the default seed (3,282 products, 611 labels), measured."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cdc import label_review, labels, migrate
from cdc.seed import SeedConfig, seed
from tests.backfill_helpers import TENANTS
from tests.label_helpers import Conn, Score, run_backfill, score

pytestmark = pytest.mark.slow


def _reviewer(conn: Conn) -> int:
    """A perfect reviewer: every open item decided from the seed's truth (tests only)."""
    decisions = []
    for item in label_review.open_items(conn):
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM seed_truth.labels WHERE tenant = %s"
            " AND product_id = %s AND url = %s)",
            (item.tenant, item.product_id, item.url),
        ).fetchone()
        verdict = "label" if row and row[0] else "none"
        decisions.append(label_review.Decision(id=item.id, decision=verdict))
    return label_review.apply_decisions(conn, decisions, by="oracle").applied


def _line(name: str, s: Score, queued: int) -> str:
    return (
        f"{name:<46} labelled {s.labelled:>5}  correct {s.correct:>4}/{s.truth}"
        f"  precision {s.precision:.3f}  recall {s.recall:.3f}  queued {queued}"
    )


def _fresh(url: str) -> None:
    with psycopg.connect(url) as conn:
        seed(conn, SeedConfig(), reset=True)
    migrate.upgrade(url)


# Ablation: products the backup does not cover lose created_at (no gap signal).
_STRIP = """
UPDATE {products} p
   SET images = (SELECT jsonb_agg(CASE WHEN jsonb_typeof(e) = 'object' THEN e - 'created_at'
                                       ELSE e END ORDER BY k)
                   FROM jsonb_array_elements(p.images) WITH ORDINALITY AS x(e, k))
 WHERE jsonb_typeof(p.images) = 'array' AND jsonb_array_length(p.images) > 0
   AND NOT EXISTS (SELECT 1 FROM legacy_backup.image_types i
                    WHERE i.tenant = %s AND i.product_id = p.id)
"""


def _strip_created_at(url: str) -> None:
    with psycopg.connect(url) as conn:
        for tenant in TENANTS:
            conn.execute(
                sql.SQL(_STRIP).format(products=sql.Identifier(tenant, "products")), (tenant,)
            )


def _measure(
    url: str, name: str, strategies: tuple[str, ...], *, evidence: bool, no_gap: bool = False
) -> tuple[list[str], Score]:
    _fresh(url)
    if no_gap:
        _strip_created_at(url)
    run_backfill(url, *strategies, evidence=evidence)
    with psycopg.connect(url, autocommit=True) as conn:
        before = score(conn)
        queued = _reviewer(conn)
        after = score(conn)
    lines = [_line(f"{name}, before review", before, queued), _line(f"{name}, after", after, 0)]
    return lines, before


def test_default_seed_numbers(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Recommended set: >= 0.95 precision and recall before review; last-image ~0.19."""
    chain = tuple(labels.RECOMMENDED[1:])
    lines, ours = _measure(database_url, "recommended + legacy evidence", chain, evidence=True)
    more, alone = _measure(database_url, "recommended, no evidence", chain, evidence=False)
    lines += more
    name = "recommended + evidence, no created_at"
    more, blind = _measure(database_url, name, chain, evidence=True, no_gap=True)
    lines += more
    _fresh(database_url)
    run_backfill(database_url, "last-image")
    with psycopg.connect(database_url) as conn:
        naive = score(conn)
    lines.append(_line("last-image", naive, 0))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert ours.truth == 611
    assert naive.labelled == 3282
    assert naive.precision < 0.2
    assert ours.precision >= 0.95
    assert ours.recall >= 0.95
    assert alone.precision >= 0.95
    assert alone.recall >= 0.95
    assert blind.precision > 0.9
    assert blind.f1 > naive.f1


def test_docs_quote_the_command() -> None:
    """docs/labels.md names the command that reproduces its numbers."""
    doc = Path(__file__).parents[1] / "docs" / "labels.md"
    assert "tests/test_labels_default_seed.py" in doc.read_text()
