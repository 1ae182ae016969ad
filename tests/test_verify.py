"""Verify: read-only, per product, recorded; heuristic labels are not drift."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from cdc import backfill, reconcile, verify
from cdc.db import connect
from cdc.errors import StageRefusedError
from cdc.progress import Silent
from cdc.stage import Stage
from tests.backfill_helpers import TENANTS, ident, scalar, set_stage

CONFIG = backfill.BackfillConfig(batch_size=50)


def backfilled(url: str, strategies: tuple[str, ...] = ("explicit",)) -> None:
    set_stage(url, "dual_write")
    config = backfill.BackfillConfig(batch_size=50, label_strategies=strategies)
    assert all(r.status == "done" for r in backfill.run(url, None, config, Silent()))


def test_verify_is_clean_after_backfill_and_recorded(migrated_url: str) -> None:
    """After a backfill every tenant verifies clean and each run is recorded as clean."""
    backfilled(migrated_url)
    outcomes = reconcile.run(migrated_url, None, mode="verify")
    assert [o.report.tenant for o in outcomes] == list(TENANTS)
    assert reconcile.overall_exit_code(outcomes) == 0
    assert sum(o.report.products_checked for o in outcomes) == 300
    with psycopg.connect(migrated_url) as conn:
        rows = conn.execute(
            "SELECT tenant, mode, stage, drift_total, exit_code, finished_at IS NOT NULL "
            "FROM imgmig.verify_runs ORDER BY tenant"
        ).fetchall()
    assert rows == [(t, "verify", "dual_write", 0, 0, True) for t in sorted(TENANTS)]


def test_verify_before_backfill_reports_missing_rows(migrated_url: str) -> None:
    """Without a backfill every product is missing its rows: exit 2, nothing written."""
    set_stage(migrated_url, "dual_write", ("user_5",))
    outcomes = reconcile.run(migrated_url, ["user_5"], mode="verify")
    report = outcomes[0].report
    assert outcomes[0].exit_code == 2
    assert report.drift["missing"] == report.products_checked == 30
    assert report.drift["extra"] == report.drift["order"] == report.drift["field"] == 0
    with connect(migrated_url, autocommit=True) as conn:
        count = sql.SQL("SELECT count(*) FROM {}").format(ident("user_5", "product_images"))
        assert scalar(conn, count) == 0


def test_verify_counts_malformed_sources_without_calling_them_drift(migrated_url: str) -> None:
    """A malformed element is reported as malformed_source, not as drift."""
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute("""UPDATE user_1.products SET images = images || '[7]' WHERE id = 2""")
    backfilled(migrated_url)
    report = reconcile.run(migrated_url, ["user_1"], mode="verify")[0].report
    assert report.drift["malformed_source"] >= 1
    assert report.drift_total == 0


def test_heuristic_labels_are_table_only_knowledge(migrated_url: str) -> None:
    """Labels decided by last-image live in the table only and are not drift."""
    backfilled(migrated_url, ("explicit", "last-image"))
    with connect(migrated_url, autocommit=True) as conn:
        labelled = scalar(conn, sql.SQL(
            "SELECT count(*) FROM {} WHERE is_label AND label_strategy = 'last-image'"
        ).format(ident("user_1", "product_images")))  # fmt: skip
    assert labelled > 0
    outcomes = reconcile.run(migrated_url, None, mode="verify")
    assert reconcile.overall_exit_code(outcomes) == 0


def test_verify_refuses_a_contracted_tenant() -> None:
    """Once the JSONB column is gone there is nothing to verify."""
    with pytest.raises(StageRefusedError):
        reconcile.check_stage("user_1", Stage.CONTRACTED, repair=False)


def test_check_statement_golden() -> None:
    """The per-batch hash comparison is composed, never concatenated."""
    text = verify.check_statement("user_1", Stage.TABLE).as_string(None)
    assert 'FROM "user_1"."products" WHERE id > %(after)s ORDER BY id LIMIT %(limit)s' in text
    assert "imgmig.images_hash(coalesce(r.images, '[]'::jsonb))" in text
    strict = verify.check_statement("user_1", Stage.DUAL_WRITE).as_string(None)
    assert "md5(coalesce(r.images, '[]'::jsonb)::text)" in strict
    assert "t.label_strategy <> 'explicit'" in strict
