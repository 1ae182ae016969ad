"""Legacy image_type evidence: idempotent import, labels and "no label" decisions, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc import backfill, label_evidence, label_heuristics, labels
from cdc.errors import EvidenceSourceError
from cdc.progress import Silent
from tests.backfill_helpers import set_stage
from tests.label_helpers import Conn, run_backfill


def test_import_is_idempotent(conn: Conn) -> None:
    """A second import adds and changes nothing; a changed type is updated in place."""
    first = label_evidence.import_legacy(conn)
    assert first.inserted == first.read > 0
    again = label_evidence.import_legacy(conn)
    assert (again.inserted, again.updated) == (0, 0)
    conn.execute(
        "UPDATE legacy_backup.image_types SET image_type = 'label'"
        " WHERE (tenant, product_id, url) = (SELECT tenant, product_id, url"
        " FROM legacy_backup.image_types WHERE image_type = 'photo' ORDER BY 1, 2, 3 LIMIT 1)"
    )
    changed = label_evidence.import_legacy(conn)
    assert (changed.inserted, changed.updated) == (0, 1)
    count = conn.execute("SELECT count(*) FROM imgmig.label_evidence").fetchone()
    assert count == (first.read,)


def test_csv_import_and_bad_rows(conn: Conn, tmp_path: Path) -> None:
    """A CSV imports like the backup; a bad row names its line and imports nothing."""
    good = tmp_path / "evidence.csv"
    good.write_text("tenant,product_id,url,image_type\nuser_1,1,https://x/a.jpg,photo\n")
    assert label_evidence.import_csv(conn, good).inserted == 1
    assert label_evidence.import_csv(conn, good).inserted == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("tenant,product_id,url,image_type\nuser_1,2,https://x/b.jpg,sticker\n")
    with pytest.raises(EvidenceSourceError, match=r"bad\.csv:2"):
        label_evidence.import_csv(conn, bad)
    with pytest.raises(EvidenceSourceError, match="no such table"):
        label_evidence.import_legacy(conn, schema="nowhere")


def test_legacy_decides_labels_and_no_labels(migrated_url: str) -> None:
    """Evidence labels its label url at 0.99 and marks all-photo products as decided."""
    run_backfill(migrated_url, "legacy-image-type", evidence=True)
    with psycopg.connect(migrated_url) as conn:
        decided = conn.execute(
            """SELECT count(DISTINCT r.product_id) FILTER (WHERE r.is_label),
                      count(DISTINCT r.product_id),
                      min(r.label_confidence), max(r.label_confidence)
                 FROM user_1.product_images r WHERE r.label_strategy = 'legacy-image-type'"""
        ).fetchone()
        expected = conn.execute(
            "SELECT count(DISTINCT product_id) FILTER (WHERE image_type = 'label'),"
            " count(DISTINCT product_id) FROM legacy_backup.image_types WHERE tenant = 'user_1'"
        ).fetchone()
    assert decided is not None
    assert expected is not None
    assert decided[0] == expected[0]
    assert decided[1] == expected[1]
    assert decided[2] == decided[3] == pytest.approx(0.99)


def test_images_added_after_the_backup_are_left_to_the_next_strategy(migrated_url: str) -> None:
    """A product with an image the evidence does not know is not decided "no label"."""
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        label_evidence.import_legacy(conn)
        (pid,) = conn.execute(
            "SELECT e.product_id FROM imgmig.label_evidence e WHERE e.tenant = 'user_1'"
            " GROUP BY 1 HAVING bool_and(image_type = 'photo') ORDER BY 1 LIMIT 1"
        ).fetchone() or (None,)
        conn.execute(
            "UPDATE user_1.products SET images = images || jsonb_build_array(jsonb_build_object("
            "'url', 'https://x/new.png', 'order', jsonb_array_length(images),"
            " 'created_at', '2026-11-01T10:00:00Z')) WHERE id = %s",
            (pid,),
        )
    set_stage(migrated_url, "dual_write", ("user_1",))
    config = backfill.BackfillConfig(label_strategies=("explicit", "legacy-image-type"))
    backfill.run(migrated_url, ["user_1"], config, Silent())
    with psycopg.connect(migrated_url) as conn:
        strategies = conn.execute(
            "SELECT DISTINCT label_strategy FROM user_1.product_images WHERE product_id = %s",
            (pid,),
        ).fetchall()
    assert strategies == [(None,)]


def test_calibration_learns_the_gap_from_the_evidence(
    conn: Conn,
) -> None:
    """Calibration on evidence products stores LRs: a gap of hours is a strong label signal."""
    label_evidence.import_legacy(conn)
    cal = label_heuristics.calibrate(conn)
    assert cal.stored
    assert cal.labels >= label_heuristics.MIN_SAMPLE
    assert cal.lr["gap:later"] > 100
    assert cal.lr["gap:session"] < 0.05
    assert cal.lr["ext:png"] > 3
    assert min(cal.checked) >= 0.95
    assert label_heuristics.load_lr(conn)["gap:later"] == pytest.approx(cal.lr["gap:later"])


def _cte_rows_read(plan: dict[str, Any], cte: str) -> int:
    """Rows the plan's scans of CTE ``cte`` read, over every loop (EXPLAIN ANALYZE)."""
    read = 0
    if plan.get("Node Type") == "CTE Scan" and plan.get("CTE Name") == cte:
        per_loop = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        read += per_loop * plan["Actual Loops"]
    return read + sum(_cte_rows_read(child, cte) for child in plan.get("Plans", ()))


def test_calibration_reads_its_sample_a_bounded_number_of_times(conn: Conn) -> None:
    """The calibration sample's work grows with the tenant, not with its square: no part
    of the plan reads the whole sample once per candidate. Each candidate's earlier image
    is looked up among its own product's rows; looked up in the sample (a CTE, no index),
    8,000 products took 13.6 s and 100,000 would take hours (session 15: 0.38 s now)."""
    label_evidence.import_legacy(conn)
    statement = label_heuristics.sample_statement("user_1")
    explain = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(statement)
    row = conn.execute(explain, {"tenant": "user_1"}).fetchone()
    assert row is not None
    sample = conn.execute(
        "SELECT count(*) FROM user_1.products p"
        " CROSS JOIN LATERAL imgmig.images_to_rows(p.images) m WHERE p.id IN"
        " (SELECT product_id FROM imgmig.label_evidence WHERE tenant = 'user_1')"
    ).fetchone()
    assert sample is not None
    assert sample[0] > 100
    assert _cte_rows_read(row[0][0]["Plan"], "sample_rows") <= 3 * sample[0]


def test_calibration_keeps_defaults_on_a_small_sample(
    conn: Conn,
) -> None:
    """Without enough evidence nothing is stored and the default LRs stay in force."""
    cal = label_heuristics.calibrate(conn)
    assert not cal.stored
    assert label_heuristics.load_lr(conn) == label_heuristics.DEFAULT_LR


def test_posterior_matches_the_documented_defaults() -> None:
    """Default LRs: png an hour later is a label; jpg in the same session is not."""
    lr = label_heuristics.DEFAULT_LR
    assert label_heuristics.posterior(lr, "png", "later", "unknown") > 0.98
    assert label_heuristics.posterior(lr, "jpg", "session", "unknown") < 0.01
    assert 0.5 < label_heuristics.posterior(lr, "jpg", "later", "unknown") < 0.9


def test_statements_are_composed_with_identifiers() -> None:
    """Golden strings: the tenant reaches SQL only as an identifier."""
    legacy = label_evidence.apply_statement("user_1").as_string(None)
    assert 'UPDATE "user_1"."product_images" r' in legacy
    assert "e.image_type = 'label'" in legacy
    meta = label_heuristics.apply_statement("user_1").as_string(None)
    assert 'FROM "user_1"."products" p' in meta
    assert "INSERT INTO imgmig.label_review" in meta
    assert "ON CONFLICT (tenant, product_id) WHERE decided_at IS NULL DO NOTHING" in meta
    assert labels.resolve(["explicit", "legacy-image-type", "metadata"])[1].name == "metadata"


def test_prepare_imports_and_calibrates_when_the_backup_is_there(conn: Conn) -> None:
    """prepare() imports the restored backup and calibrates; without it, it does nothing."""
    cal = label_heuristics.prepare(conn)
    assert cal is not None
    assert cal.stored
    conn.execute("DROP SCHEMA legacy_backup CASCADE")
    assert label_heuristics.prepare(conn) is None
