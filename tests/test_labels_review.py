"""The label review queue: export, a person's decisions, apply, report, and the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cdc import label_report, label_review
from cdc.errors import ReviewFileError
from tests.backfill_helpers import set_stage
from tests.label_helpers import Conn, max_labels_per_product, run_backfill, score

_IS_TRUE = (
    "SELECT EXISTS (SELECT 1 FROM seed_truth.labels WHERE tenant = %s AND product_id = %s"
    " AND url = %s)"
)


def _truth(conn: Conn, tenant: str, pid: int, url: str) -> bool:
    row = conn.execute(_IS_TRUE, (tenant, pid, url)).fetchone()
    return bool(row and row[0])


def _queued(url: str) -> None:
    """Metadata on its default LRs (no evidence): jpg labels and png photos get queued."""
    run_backfill(url, "legacy-image-type", "metadata")


def test_csv_round_trip_with_a_reviewer(migrated_url: str, tmp_path: Path) -> None:
    """Exported items decided from the truth, applied, leave no open item and 1.0/1.0."""
    _queued(migrated_url)
    path = tmp_path / "review.csv"
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        written = label_review.export(conn, path)
        assert written > 0
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            truth = _truth(conn, row["tenant"], int(row["product_id"]), row["url"])
            row["decision"] = "label" if truth else "none"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=label_review.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        result = label_review.apply_file(conn, path, by="alice")
        assert (result.applied, result.stale) == (written, 0)
        after = score(conn)
        assert (after.precision, after.recall) == (1.0, 1.0)
        assert max_labels_per_product(conn) == 1
        assert label_review.open_items(conn) == []
        who = conn.execute(
            "SELECT DISTINCT decided_by, decided_at IS NOT NULL FROM imgmig.label_review"
        ).fetchall()
        assert who == [("alice", True)]
        again = label_review.apply_file(conn, path, by="bob")
        assert (again.applied, again.stale) == (0, written)


def test_json_decisions_override_the_proposal(migrated_url: str, tmp_path: Path) -> None:
    """A reviewer can turn a proposed label into none and a proposed none into a label."""
    _queued(migrated_url)
    path = tmp_path / "review.json"
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        label_review.export(conn, path)
        items = json.loads(path.read_text())
        yes = next(i for i in items if i["proposed"] == "none")
        no = next(i for i in items if i["proposed"] == "label")
        yes["decision"], no["decision"] = "label", "none"
        path.write_text(json.dumps(items))
        assert label_review.apply_file(conn, path, by="carol").applied == 2
        query = sql.SQL(
            "SELECT id, is_label, label_strategy, label_confidence FROM {}"
            " WHERE product_id = %s AND is_label"
        )
        for item, expected in ((yes, [(yes["image_id"], True, "review", 1.0)]), (no, [])):
            table = sql.Identifier(item["tenant"], "product_images")
            found = conn.execute(query.format(table), (item["product_id"],)).fetchall()
            assert found == expected
        assert len(label_review.open_items(conn)) == len(items) - 2


def test_a_review_label_replaces_the_previous_one(migrated_url: str, tmp_path: Path) -> None:
    """Labelling another image of an already labelled product keeps one label per product."""
    _queued(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        pid, first, other = conn.execute(
            "SELECT product_id, max(id) FILTER (WHERE is_label), min(id) FROM"
            " user_1.product_images GROUP BY 1 HAVING bool_or(is_label) ORDER BY 1 LIMIT 1"
        ).fetchone() or (0, 0, 0)
        assert first != other
        conn.execute(
            "DELETE FROM imgmig.label_review WHERE tenant = 'user_1' AND product_id = %s", (pid,)
        )
        (item,) = conn.execute(
            "INSERT INTO imgmig.label_review (tenant, product_id, image_id, url, strategy,"
            " confidence, proposed, reason) VALUES ('user_1', %s, %s, 'x', 'test', 0.5, false,"
            " 'test') RETURNING id",
            (pid, other),
        ).fetchone() or (0,)
        decisions = [label_review.Decision(id=item, decision="label")]
        assert label_review.apply_decisions(conn, decisions, by="dan").applied == 1
        rows = conn.execute(
            "SELECT id FROM user_1.product_images WHERE product_id = %s AND is_label", (pid,)
        ).fetchall()
        assert rows == [(other,)]


def test_stale_and_bad_files(migrated_url: str, tmp_path: Path) -> None:
    """A gone image is stale; blank decisions are skipped; a bad value refuses the file."""
    _queued(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        item = label_review.open_items(conn)[0]
        conn.execute(
            f"DELETE FROM {item.tenant}.product_images WHERE id = %s",
            (item.image_id,),
        )
        decisions = [label_review.Decision(id=item.id, decision="label")]
        assert label_review.apply_decisions(conn, decisions, by="eve").stale == 1
        blank = tmp_path / "blank.csv"
        blank.write_text("id,decision\n1,\n")
        assert label_review.read_file(blank) == []
        bad = tmp_path / "bad.csv"
        bad.write_text("id,decision\n1,maybe\n")
        with pytest.raises(ReviewFileError, match="record 1"):
            label_review.apply_file(conn, bad, by="eve")
        with pytest.raises(ReviewFileError, match="no such file"):
            label_review.read_file(tmp_path / "missing.csv")


def test_report_counts_every_product_once(migrated_url: str) -> None:
    """The report adds up to every product, and the queue size matches the open items."""
    run_backfill(migrated_url, "legacy-image-type", "metadata", evidence=True)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        rep = label_report.build(conn, ["user_1", "user_2", "user_4", "user_5"])
        products = conn.execute(
            "SELECT (SELECT count(*) FROM user_1.products) + (SELECT count(*) FROM"
            " user_2.products) + (SELECT count(*) FROM user_4.products)"
            " + (SELECT count(*) FROM user_5.products)"
        ).fetchone()
        assert products is not None
        assert sum(x.labelled + x.unlabelled for x in rep.lines) == products[0]
        assert rep.labelled() == score(conn).labelled
        assert rep.queue_open == len(label_review.open_items(conn))
        assert {x.strategy for x in rep.lines} <= {"legacy-image-type", "metadata", "explicit"}
        assert rep.calibrated
        assert rep.evidence["label"] > 0


def _imgmig(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_cli_verbs(migrated_url: str, tmp_path: Path) -> None:
    """import-legacy, apply, report, export-review and apply-review work end to end."""
    set_stage(migrated_url, "dual_write")
    backfilled = _imgmig(migrated_url, "backfill", "--all")
    assert backfilled.returncode == 0, backfilled.stderr
    imported = _imgmig(migrated_url, "labels", "import-legacy")
    assert imported.returncode == 0, imported.stderr
    assert "new 0" not in imported.stdout
    applied = _imgmig(migrated_url, "labels", "apply")
    assert applied.returncode == 0, applied.stderr
    assert "user_1: 0 labels set" not in applied.stdout  # the CLI backfill left them
    assert "template_tenant: skipped at stage jsonb" in applied.stdout
    rerun = _imgmig(migrated_url, "labels", "apply", "--tenant", "user_1")
    assert "user_1: 0 labels set" in rerun.stdout  # decided products stay decided
    shown = _imgmig(migrated_url, "labels", "report")
    assert shown.returncode == 0, shown.stderr
    assert "legacy-image-type" in shown.stdout
    assert "review queue:" in shown.stdout
    out = tmp_path / "q.csv"
    exported = _imgmig(migrated_url, "labels", "export-review", str(out))
    assert exported.returncode == 0, exported.stderr
    assert out.read_text().startswith("id,tenant,product_id")
    reviewed = _imgmig(migrated_url, "labels", "apply-review", str(out), "--by", "frank")
    assert reviewed.returncode == 0, reviewed.stderr
    assert "0 decisions applied" in reviewed.stdout
    refused = _imgmig(migrated_url, "labels", "apply", "--strategy", "last_image")
    assert refused.returncode == 4
