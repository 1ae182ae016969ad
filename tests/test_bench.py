"""Each benchmark in bench/ runs end to end at a tiny size and prints what it promises.

The figures in BENCHMARKS.md come from these scripts at full size; this keeps them from
rotting between the sessions that run them. Each runs as the README says (a subprocess,
against DATABASE_URL), in a scratch database of its own, dropped afterwards. What is
asserted is what each one reports, not how fast: every ratio it prints is a positive
number, and where the run itself fixes a count (rows migrated, products refreshed) that
count.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cdc import server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scratch(pg: server.Server) -> Iterator[str]:
    """A database name for one benchmark run; dropped after it, whatever happened."""
    name = f"bench_smoke_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(server.with_database(pg.url, "postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def run_bench(pg: server.Server, database: str, script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--database", database, *args],
        env={**os.environ, "DATABASE_URL": pg.url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"{pattern!r} not in:\n{text}"
    return float(found.group(1).replace(",", ""))


def test_backfill_bench(pg: server.Server, scratch: str) -> None:
    out = run_bench(pg, scratch, "backfill_bench.py", "--products", "1500", "--idle-s", "1",
                    "--repeat", "2")  # fmt: skip
    raw_rows = number(r"^raw INSERT…SELECT: ([\d,]+) rows", out)
    migrated = [float(n.replace(",", "")) for n in re.findall(r"^backfill: ([\d,]+) rows", out,
                                                               re.MULTILINE)]  # fmt: skip
    assert raw_rows > 1500  # several images a product
    assert migrated == [raw_rows, raw_rows]  # every image, in each repetition
    assert number(r"^medians of 2: throughput ratio ([\d.]+)", out) > 0
    assert number(r"writer p99 ratio ([\d.]+) \(", out) > 0
    assert number(r"raw statement ([\d.]+) \(", out) > 0  # the reference, one connection
    assert number(r"raw statement in 2 connections: median ([\d.]+)", out) > 0
    assert number(r"^backfill peak RSS: (\d+) MiB", out) > 0


def test_capture_bench(pg: server.Server, scratch: str) -> None:
    out = run_bench(pg, scratch, "capture_bench.py", "--products", "1500", "--seconds", "1",
                    "--rounds", "1")  # fmt: skip
    assert number(r"^no trigger\s+(\d+) tx/s", out) > 0
    for mode in ("inline", "deferred", "ref_event", "ref_min"):
        assert number(rf"^{mode}\s+\d+ tx/s\s+([\d.]+)x", out) > 0, mode
    assert number(r"^projector caught up (\d+) products", out) > 0  # deferred's backlog


def test_batch_bench(pg: server.Server, scratch: str) -> None:
    out = run_bench(pg, scratch, "batch_bench.py", "--products", "1500", "--batch", "500",
                    "--rounds", "2")  # fmt: skip
    assert number(r"^auto / always: ([\d.]+)x the time", out) > 0


def test_label_refresh_bench(pg: server.Server, scratch: str) -> None:
    out = run_bench(pg, scratch, "label_refresh_bench.py", "--products", "1500")
    assert number(r"^refresh_tenant, batches of 1,000: [\d.]+ s for ([\d,]+) products", out) == 1500
    assert number(r"^calibrate: [\d.]+ s on ([\d,]+) labels", out) > 0


def test_mapping_bench(pg: server.Server, scratch: str) -> None:
    out = run_bench(pg, scratch, "mapping_bench.py", "--products", "500", "--calls", "50",
                    "--rounds", "1")  # fmt: skip
    for case in ("legacy, 1 element", "appended element", "general path"):
        assert number(rf"^{case}\s+[\d.]+ ->\s+[\d.]+ us per call\s+([\d.]+)x", out) > 0, case
    assert number(r"^batch\s+[\d.]+ ->\s+[\d.]+ ms for 500 products\s+([\d.]+)x", out) > 0
