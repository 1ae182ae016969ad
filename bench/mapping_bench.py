"""Mapping benchmark: the canonical mapping against the previous one, per call and per batch.

One command (against DATABASE_URL, else a throwaway embedded PostgreSQL):

    .venv/bin/python bench/mapping_bench.py

1. Create a scratch database, seed one tenant with ``--products`` products (the seed's
   legacy arrays and its share of malformed ones) and install the SQL of the current
   version.
2. In ``--rounds`` rounds, for the previous mapping file and the current one in turn
   (each reinstalled with ``CREATE OR REPLACE``, as its revision does):
   - single calls, as the capture trigger makes them: ``--calls`` calls of
     ``imgmig.images_to_rows`` from one PL/pgSQL loop (plans cached, as in a trigger),
     for a one-element legacy array, an element appended at order 5 (how capture v5 maps
     an append), a five-element legacy array, and an element with an ``alt_text`` (the
     general path);
   - a batch, as the backfill runs it: every product through a ``LATERAL`` call, counted.
3. Print the median per case and mapping, and current ÷ previous.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc import capture, server
from cdc.seed import SeedConfig, seed

DB = "imgmig_mapping_bench"
TENANT = "user_1"
MAPPINGS = tuple(name for name in capture.CURRENT_SQL if name.startswith("mapping_"))


def element(order: int, **extra: object) -> dict[str, object]:
    return {
        "url": f"https://cdn.example/{order}.jpg",
        "order": order,
        "created_at": "2026-01-31T10:00:00.000000Z",
        **extra,
    }


CASES = {
    "legacy, 1 element": [element(0)],
    "appended element": [element(5)],
    "legacy, 5 elements": [element(i) for i in range(5)],
    "general path": [element(0, alt_text="a")],
}

LOOP = """DO $$
DECLARE v jsonb := {value}; n integer;
BEGIN
  FOR i IN 1..{calls} LOOP
    SELECT count(*) INTO n FROM imgmig.images_to_rows(v);
  END LOOP;
END $$"""


def per_call_us(conn: psycopg.Connection[tuple[object, ...]], value: object, calls: int) -> float:
    stmt = sql.SQL(LOOP).format(value=sql.Literal(Jsonb(value)), calls=sql.Literal(calls))
    started = time.perf_counter()
    conn.execute(stmt)
    return (time.perf_counter() - started) / calls * 1e6


def batch_ms(conn: psycopg.Connection[tuple[object, ...]]) -> float:
    stmt = sql.SQL(
        "SELECT count(*) FROM {} p CROSS JOIN LATERAL imgmig.images_to_rows(p.images) m"
    ).format(sql.Identifier(TENANT, "products"))
    started = time.perf_counter()
    conn.execute(stmt)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--database", default=DB, help="scratch database, dropped and created")
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    previous, current = MAPPINGS[-2], MAPPINGS[-1]
    with server.provide(os.environ.get("DATABASE_URL")) as srv:
        url = server.fresh_database(srv.url, args.database)
        with psycopg.connect(url, autocommit=True) as conn:
            seed(conn, SeedConfig(tenants=1, products=args.products, labels=0, seed=1))
            capture.install_sql(conn)
            version = conn.execute("SHOW server_version").fetchone()
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for name in (previous, current):
                    capture.install_sql(conn, (name,))
                    for case, value in CASES.items():
                        us = per_call_us(conn, value, args.calls)
                        results.setdefault((case, name), []).append(us)
                    results.setdefault(("batch", name), []).append(batch_ms(conn))
            capture.install_sql(conn, (current,))
    print(
        f"\nPostgreSQL {version[0] if version else '?'}: {previous} against {current}, "
        f"medians of {args.rounds} rounds"
    )
    for case in (*CASES, "batch"):
        old = statistics.median(results[(case, previous)])
        new = statistics.median(results[(case, current)])
        unit = f"ms for {args.products:,} products" if case == "batch" else "us per call"
        print(f"{case:20s} {old:8.1f} -> {new:8.1f} {unit:28s} {new / old:5.2f}x the time")


if __name__ == "__main__":
    main()
