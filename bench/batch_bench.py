"""Batch benchmark: one backfill batch statement with and without the product_id check.

One command (against DATABASE_URL, else a throwaway embedded PostgreSQL):

    .venv/bin/python bench/batch_bench.py

1. Create a scratch database, seed one tenant with ``--products`` products, migrate it
   and move it to ``dual_write`` (capture on, as during a real backfill).
2. In ``--rounds`` rounds, for each of ``always`` (PostgreSQL's foreign-key check fires
   for every row) and ``auto`` (the batch skips it as ``imgmig backfill`` does where
   allowed: cdc/fkcheck.py), run the backfill's batch statement
   (``backfill.lock_and_project``) over ``--batch`` products from the same start, and
   roll it back. The start moves each round, so the rounds read different products, and
   which mode goes first (and reads the pages cold) alternates.
3. Print the median time per mode, and auto ÷ always.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import psycopg
from psycopg import sql

from cdc import backfill, fkcheck, migrate, server, stage
from cdc.db import connect
from cdc.seed import SeedConfig, seed

DB = "imgmig_batch_bench"
TENANT = "user_1"


def batch_ms(conn: psycopg.Connection[tuple[object, ...]], after: int, size: int) -> float:
    """One batch statement, timed, then rolled back (the caller's transaction)."""
    started = time.perf_counter()
    conn.execute(
        backfill.lock_and_project(TENANT),
        {"after": after, "max_id": 2**62, "limit": size, "tenant": TENANT},
    )
    took = (time.perf_counter() - started) * 1e3
    conn.rollback()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=60_000)
    parser.add_argument("--database", default=DB, help="scratch database, dropped and created")
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with server.provide(os.environ.get("DATABASE_URL")) as srv:
        url = server.fresh_database(srv.url, args.database)
        with psycopg.connect(url) as conn:
            seed(conn, SeedConfig(tenants=1, products=args.products, labels=0, seed=1))
        migrate.upgrade(url, tenants=[TENANT])
        with psycopg.connect(url) as conn:
            stage.set_stage(conn, TENANT, "dual_write", reason="benchmark")
            conn.commit()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TENANT, "products")))
        results: dict[str, list[float]] = {"always": [], "auto": []}
        with connect(url, batch=True) as conn:  # jit off, as the backfill's connections
            version = conn.execute("SHOW server_version").fetchone()
            role = fkcheck.allowed(conn)
            if role is None:
                raise SystemExit("this role may not set session_replication_role")
            starts = range(0, max(args.products - args.batch, 1), max(args.batch // 2, 1))
            for turn in range(args.rounds):
                after = starts[turn % len(starts)]
                order = list(results) if turn % 2 == 0 else list(reversed(results))
                for mode in order:  # who goes first (cold pages) alternates
                    times = results[mode]
                    if mode == "auto" and fkcheck.enter(conn, TENANT):
                        raise SystemExit("another trigger would be skipped: not measured")
                    times.append(batch_ms(conn, after, args.batch))
    always, auto = (statistics.median(results[m]) for m in ("always", "auto"))
    print(
        f"\nPostgreSQL {version[0] if version else '?'}: one batch of {args.batch:,} products, "
        f"medians of {args.rounds} rounds"
    )
    for mode, times in results.items():
        print(f"{mode:7s} {statistics.median(times):8.0f} ms   {[round(t) for t in times]}")
    print(f"auto / always: {auto / always:.2f}x the time")


if __name__ == "__main__":
    main()
