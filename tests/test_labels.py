"""Label strategies at backfill time: explicit wins, last-image is opt-in and low-confidence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc import backfill, labels
from cdc.errors import UnknownLabelStrategyError
from cdc.progress import Silent
from tests.backfill_helpers import ident, scalar, set_stage

T = "user_1"


def run(url: str, *strategies: str) -> None:
    set_stage(url, "dual_write", (T,))
    config = backfill.BackfillConfig(batch_size=50, label_strategies=("explicit", *strategies))
    assert backfill.run(url, [T], config, Silent())[0].status == "done"


def label_rows(conn: psycopg.Connection[Any], product: int) -> list[tuple[Any, ...]]:
    query = sql.SQL(
        'SELECT "order", label_strategy, label_confidence FROM {} '
        'WHERE product_id = %s AND is_label ORDER BY "order"'
    ).format(ident(T, "product_images"))
    return conn.execute(query, (product,)).fetchall()


def mark(conn: psycopg.Connection[Any], product: int, path: str, value: bool) -> None:
    """Set is_label on one element of a product's JSONB (before capture is on)."""
    conn.execute(
        sql.SQL("UPDATE {} SET images = jsonb_set(images, %s, %s::jsonb) WHERE id = %s").format(
            ident(T, "products")
        ),
        (path, "true" if value else "false", product),
    )


def test_last_image_is_off_by_default(migrated_url: str) -> None:
    """Without explicit evidence and without opting in, nothing is labelled."""
    run(migrated_url)
    with psycopg.connect(migrated_url) as conn:
        labelled = sql.SQL("SELECT count(*) FROM {} WHERE is_label").format(
            ident(T, "product_images")
        )
        assert scalar(conn, labelled) == 0


def test_explicit_flag_wins_over_last_image(migrated_url: str) -> None:
    """An element flagged is_label decides with confidence 1.0; last-image stays out."""
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        mark(conn, 5, "{0,is_label}", True)
        mark(conn, 6, "{0,is_label}", False)  # explicit "no label" also decides
    run(migrated_url, "last-image")
    with psycopg.connect(migrated_url) as conn:
        assert label_rows(conn, 5) == [(0, "explicit", 1.0)]
        assert label_rows(conn, 6) == []


def test_last_image_labels_the_highest_order_with_low_confidence(migrated_url: str) -> None:
    """Opted in, last-image labels each undecided product's last image at confidence 0.19."""
    run(migrated_url, "last-image")
    with psycopg.connect(migrated_url) as conn:
        last = scalar(conn, sql.SQL("SELECT max(\"order\") FROM {} WHERE product_id = 7").format(
            ident(T, "product_images")))  # fmt: skip
        [(order, strategy, confidence)] = label_rows(conn, 7)
        assert (order, strategy) == (last, "last-image")
        assert confidence == pytest.approx(0.19)
        per_product = scalar(conn, sql.SQL(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM {} WHERE is_label GROUP BY product_id) c"
        ).format(ident(T, "product_images")))  # fmt: skip
        assert per_product == 1


def test_last_image_precision_matches_its_confidence(migrated_url: str) -> None:
    """Against the seed's truth (tests only), last-image is right about 1 time in 5."""
    run(migrated_url, "last-image")
    with psycopg.connect(migrated_url) as conn:
        hits = scalar(conn, sql.SQL(
            "SELECT count(*) FROM {} r JOIN seed_truth.labels s "
            "ON s.tenant = %s AND s.product_id = r.product_id AND s.url = r.url WHERE r.is_label"
        ).format(ident(T, "product_images")), T)  # fmt: skip
        labelled = scalar(conn, sql.SQL("SELECT count(*) FROM {} WHERE is_label").format(
            ident(T, "product_images")))  # fmt: skip
    assert labelled == 120
    assert 0.05 < hits / labelled < 0.4


def test_unknown_strategy_is_a_typed_error() -> None:
    """A misspelt strategy is refused with the list of known ones."""
    with pytest.raises(UnknownLabelStrategyError) as info:
        labels.resolve(["explicit", "last_image"])
    assert "last-image" in str(info.value)


def test_apply_statement_golden() -> None:
    """The strategy statement is composed with identifiers, one per batch."""
    text = labels.apply_statement("user_1", labels.LastImage()).as_string(None)
    assert 'FROM "user_1"."products" p' in text
    assert 'UPDATE "user_1"."product_images" r' in text
    assert 'ORDER BY r.product_id, r."order" DESC, r.id DESC' in text


def test_label_and_backfill_code_never_reads_the_seed_truth() -> None:
    """Detection code neither queries seed_truth nor imports its schema name."""
    root = Path(labels.__file__).parent
    for name in ("labels.py", "backfill.py", "verify.py", "reconcile.py", "checkpoint.py"):
        text = (root / name).read_text()
        assert "seed_truth." not in text, name
        assert "TRUTH_SCHEMA" not in text, name
