"""Label detection against the seed's truth: the default set versus "the last image"."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc import labels
from tests.backfill_helpers import TENANTS
from tests.label_helpers import Conn, Score, max_labels_per_product, run_backfill, score


def test_recommended_set_is_explicit_legacy_then_metadata() -> None:
    """The recommended set is the evidence chain, strongest first; last-image stays opt-in."""
    assert labels.RECOMMENDED == ("explicit", "legacy-image-type", "metadata")
    assert "last-image" in labels.known()
    assert "last-image" not in labels.RECOMMENDED
    assert "last-image" not in labels.DEFAULT


def test_default_set_is_far_better_than_last_image(migrated_url: str) -> None:
    """With legacy evidence, precision and recall >= 0.95; last-image's precision is ~0.2."""
    run_backfill(migrated_url, "legacy-image-type", "metadata", evidence=True)
    with psycopg.connect(migrated_url) as conn:
        ours = score(conn)
        assert max_labels_per_product(conn) == 1
    assert ours.precision >= 0.95
    assert ours.recall >= 0.95
    naive = _last_image_score(migrated_url)
    assert naive.precision < 0.4
    assert ours.precision > naive.precision
    assert ours.f1 > naive.f1


def _last_image_score(url: str) -> Score:
    """last-image on the same data: clear every non-explicit decision, then opt in."""
    with psycopg.connect(url, autocommit=True) as conn:
        for tenant in TENANTS:
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET is_label = false, label_strategy = NULL,"
                    " label_confidence = NULL WHERE label_strategy IS DISTINCT FROM 'explicit'"
                ).format(sql.Identifier(tenant, "product_images"))
            )
            labels.apply_tenant(conn, tenant, labels.resolve(["last-image"]))
        return score(conn)


def test_metadata_alone_without_evidence(migrated_url: str) -> None:
    """With no evidence imported, the metadata heuristics alone still reach 0.95/0.95."""
    run_backfill(migrated_url, "legacy-image-type", "metadata")
    with psycopg.connect(migrated_url) as conn:
        result = score(conn)
    assert result.precision >= 0.95
    assert result.recall >= 0.95


def _add_live_photos(conn: Conn, every: int = 3) -> int:
    """Demo traffic: a new .jpg photo (created now) before a label, or last if none."""
    now = datetime.now(UTC).isoformat()
    changed = 0
    for tenant in TENANTS:
        products = sql.Identifier(tenant, "products")
        rows = conn.execute(
            sql.SQL(
                "SELECT p.id, p.images, EXISTS (SELECT 1 FROM seed_truth.labels s WHERE"
                " s.tenant = %s AND s.product_id = p.id) FROM {} p WHERE p.id %% %s = 0"
            ).format(products),
            (tenant, every),
        ).fetchall()
        for pid, images, has_label in rows:
            if not _clean(images):
                continue
            new = {"url": f"https://cdn.example/{tenant}/new-{pid}.jpg", "created_at": now}
            at = len(images) - 1 if has_label else len(images)
            grown = [*images[:at], new, *images[at:]]
            for k, element in enumerate(grown):
                element["order"] = k
            query = sql.SQL("UPDATE {} SET images = %s::jsonb WHERE id = %s").format(products)
            conn.execute(query, (json.dumps(grown), pid))
            changed += 1
    return changed


def _clean(images: Any) -> bool:
    return isinstance(images, list) and all(
        isinstance(e, dict) and e.get("order") == k for k, e in enumerate(images)
    )


@pytest.mark.parametrize("evidence", [True, False], ids=["evidence", "no-evidence"])
def test_new_photos_do_not_fool_the_heuristics(migrated_url: str, evidence: bool) -> None:
    """New photos inserted before a label, or appended to a product without one, change nothing."""
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        assert _add_live_photos(conn) > 50
    run_backfill(migrated_url, "legacy-image-type", "metadata", evidence=evidence)
    with psycopg.connect(migrated_url) as conn:
        result = score(conn)
    assert result.precision >= 0.95
    assert result.recall >= 0.95


def test_explicit_flag_still_wins(migrated_url: str) -> None:
    """An element that states is_label decides its product over evidence and heuristics."""
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        truth = conn.execute(
            "SELECT product_id FROM seed_truth.labels WHERE tenant = 'user_1' ORDER BY 1 LIMIT 2"
        ).fetchall()
        (yes,), (no,) = truth
        flag = sql.SQL(
            "UPDATE user_1.products SET images = jsonb_set(images, %s, %s) WHERE id = %s"
        )
        conn.execute(flag, ("{0,is_label}", "true", yes))
        conn.execute(flag, ("{0,is_label}", "false", no))
    run_backfill(migrated_url, "legacy-image-type", "metadata", evidence=True)
    with psycopg.connect(migrated_url) as conn:
        query = (
            'SELECT product_id, "order", label_strategy FROM user_1.product_images'
            " WHERE product_id = ANY (%s) AND is_label ORDER BY 1"
        )
        assert conn.execute(query, ([yes, no],)).fetchall() == [(yes, 0, "explicit")]
