"""Reconcile: drift injected on purpose is classified per class and repaired."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc import backfill, reconcile
from cdc import verify as verify_mod
from cdc.errors import StageChangedError, StageRefusedError
from cdc.progress import Silent
from cdc.stage import Stage
from tests.backfill_helpers import exact_mismatches, ident, scalar, set_stage

T = "user_1"


def backfilled(url: str, tenant: str = T) -> None:
    set_stage(url, "dual_write", (tenant,))
    config = backfill.BackfillConfig(batch_size=50)
    assert backfill.run(url, [tenant], config, Silent())[0].status == "done"


def images(tenant: str = T) -> sql.Identifier:
    return ident(tenant, "product_images")


def inject_drift(conn: psycopg.Connection[Any]) -> None:
    """One product per class: 10 missing, 11 order, 12 extra, 13 and 14 field."""
    conn.execute(sql.SQL(
        'DELETE FROM {} WHERE id = (SELECT max(id) FROM {} WHERE product_id = 10)'
    ).format(images(), images()))  # fmt: skip
    conn.execute(sql.SQL(
        'UPDATE {} SET "order" = CASE "order" WHEN 0 THEN 1 ELSE 0 END '
        'WHERE product_id = 11 AND "order" IN (0, 1)'
    ).format(images()))  # fmt: skip
    conn.execute(sql.SQL(
        "INSERT INTO {} (product_id, url, \"order\") VALUES (12, 'https://evil.example/x.jpg', 99)"
    ).format(images()))  # fmt: skip
    conn.execute(sql.SQL(
        "UPDATE {} SET alt_text = 'tampered' WHERE product_id = 13 AND \"order\" = 0"
    ).format(images()))  # fmt: skip
    conn.execute(sql.SQL(
        "UPDATE {} SET mime_type = 'image/gif', width = 1 WHERE product_id = 14 AND \"order\" = 1"
    ).format(images()))  # fmt: skip


def test_injected_drift_is_classified_and_repaired(migrated_url: str) -> None:
    """Deleted rows, corrupted orders, extra rows and changed fields: each class, repaired."""
    backfilled(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        inject_drift(conn)
        assert exact_mismatches(conn, T) == 5
    outcome = reconcile.run(migrated_url, [T])[0]
    assert sorted(outcome.report.drifted) == [10, 11, 12, 13, 14]
    drift = outcome.report.drift
    assert (drift["missing"], drift["order"], drift["extra"], drift["field"]) == (1, 1, 1, 2)
    assert (outcome.repaired, outcome.left_over, outcome.exit_code) == (5, 0, 1)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        assert exact_mismatches(conn, T) == 0
        events = scalar(conn, sql.SQL(
            "SELECT count(DISTINCT aggregateid) FROM {} WHERE source = 'reconcile'"
        ).format(ident(T, "image_events")))  # fmt: skip
        assert events == 5
        run = conn.execute(
            "SELECT mode, drift_total, repaired, left_over, exit_code, drift ->> 'field' "
            "FROM imgmig.verify_runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert run == ("reconcile", 5, 5, 0, 1, "2")
    again = reconcile.run(migrated_url, [T])[0]
    assert again.exit_code == 0


def test_no_repair_leaves_drift_and_exits_2(migrated_url: str) -> None:
    """--no-repair only reports: the drift stays and the exit code is 2."""
    backfilled(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        inject_drift(conn)
    outcome = reconcile.run(migrated_url, [T], do_repair=False)[0]
    assert (outcome.report.drift_total, outcome.left_over, outcome.exit_code) == (5, 5, 2)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        assert exact_mismatches(conn, T) == 5


def test_table_stage_repairs_jsonb_from_the_rows(migrated_url: str) -> None:
    """At stage table the rows are the truth: a stale JSONB is rewritten from them."""
    backfilled(migrated_url)
    set_stage(migrated_url, "table", (T,))
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        # Bypass every trigger, as a restore or a manual fix would.
        conn.execute("SET session_replication_role = replica")
        conn.execute(sql.SQL("UPDATE {} SET images = images - 0 WHERE id = 20").format(
            ident(T, "products")))  # fmt: skip
        conn.execute(sql.SQL("UPDATE {} SET alt_text = 'from table' WHERE product_id = 21")
                     .format(images()))  # fmt: skip
        conn.execute("RESET session_replication_role")
    outcome = reconcile.run(migrated_url, [T])[0]
    assert sorted(outcome.report.drifted) == [20, 21]
    assert outcome.report.drift["missing"] == 1
    assert outcome.report.drift["field"] == 1
    assert (outcome.left_over, outcome.exit_code) == (0, 1)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        alt = scalar(conn, sql.SQL("SELECT images -> 0 ->> 'alt_text' FROM {} WHERE id = 21")
                     .format(ident(T, "products")))  # fmt: skip
        rows = scalar(conn, sql.SQL("SELECT count(*) FROM {} WHERE product_id = 20")
                      .format(images()))  # fmt: skip
        length = scalar(conn, sql.SQL("SELECT jsonb_array_length(images) FROM {} WHERE id = 20")
                        .format(ident(T, "products")))  # fmt: skip
    assert alt == "from table"
    assert rows == length


def test_reconcile_refuses_a_tenant_without_capture(migrated_url: str) -> None:
    """A named tenant at stage jsonb is refused with the reason."""
    with pytest.raises(StageRefusedError) as info:
        reconcile.run(migrated_url, ["user_2"])
    assert "no change capture" in str(info.value)


def test_a_label_set_behind_the_jsonb_is_field_drift_and_is_cleared(migrated_url: str) -> None:
    """A label written to the table only (no strategy, no element flag) is field drift."""
    backfilled(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute(sql.SQL(
            "UPDATE {} SET is_label = true WHERE product_id = 30 AND \"order\" = 0"
        ).format(images()))  # fmt: skip
    outcome = reconcile.run(migrated_url, [T])[0]
    assert outcome.report.drifted == [30]
    assert outcome.report.drift["field"] == 1
    assert outcome.exit_code == 1
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        labels = scalar(conn, sql.SQL("SELECT count(*) FROM {} WHERE product_id = 30 AND is_label")
                        .format(images()))  # fmt: skip
    assert labels == 0


def test_batch_statement_golden() -> None:
    """The backfill's batch locks its products, then projects them in one statement."""
    text = backfill.lock_and_project("user_1").as_string(None)
    assert 'SELECT id FROM "user_1"."products"' in text
    assert "ORDER BY id LIMIT %(limit)s\n              FOR NO KEY UPDATE" in text
    assert "imgmig.snapshot_batch(%(tenant)s, b.ids, 'backfill', true)" in text


def test_a_repair_stops_when_the_stage_moved_since_its_verify(migrated_url: str) -> None:
    """Which side is the truth follows the stage: a repair planned at dual_write (JSONB the
    truth) must not run once the tenant is at table, where it would strip the rows'
    table-only values and write them over the JSONB. It stops, and writes nothing."""
    backfilled(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        inject_drift(conn)
        report = verify_mod.check(conn, T, Stage.DUAL_WRITE)
        assert 13 in report.drifted
        set_stage(migrated_url, "table", (T,))
        with pytest.raises(StageChangedError, match="'dual_write' to 'table'"):
            reconcile.repair(conn, T, Stage.DUAL_WRITE, report.drifted)
        kept = conn.execute(
            sql.SQL('SELECT alt_text FROM {} WHERE product_id = 13 AND "order" = 0').format(
                images()
            )
        ).fetchone()
    assert kept == ("tampered",), "at table the rows are the truth: left as they are"
