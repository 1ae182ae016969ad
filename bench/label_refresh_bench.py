"""Label refresh benchmark: how long re-deriving the metadata decisions takes.

One command (against DATABASE_URL, else a throwaway embedded PostgreSQL):

    .venv/bin/python bench/label_refresh_bench.py --products 100000

1. Create a scratch database, seed one tenant with ``--products`` products, migrate it,
   move it to ``dual_write`` and backfill it with ``explicit, metadata``, so every
   product carries a metadata decision. The fresh ``product_images`` has no statistics
   yet, as after a real backfill: the case that made the first version JIT-compile.
2. Time ``refresh_product`` on three products (what a service edit or a converter runs),
   then ``refresh_tenant`` (what reconcile runs) with batches of 1,000 and 5,000.
3. Print the times and how many labels moved (0: nothing changed since the backfill).
4. Import the seed's legacy evidence and time ``calibrate`` on the tenant (what
   ``imgmig labels import-legacy`` runs): its sample reads every product with evidence.
"""

from __future__ import annotations

import argparse
import time

import psycopg
from psycopg import sql

from cdc import backfill, label_evidence, label_heuristics, migrate, server, stage
from cdc.progress import Silent
from cdc.seed import SeedConfig, seed

DB = "imgmig_label_refresh_bench"
TENANT = "user_1"


def prepare(base_url: str, products: int, database: str = DB) -> str:
    url = server.fresh_database(base_url, database)
    with psycopg.connect(url) as conn:
        seed(conn, SeedConfig(tenants=1, products=products, labels=products // 5, seed=1))
    migrate.upgrade(url, tenants=[TENANT])
    with psycopg.connect(url) as conn:
        stage.set_stage(conn, TENANT, "dual_write", reason="benchmark", actor="bench", force=True)
        conn.commit()
    config = backfill.BackfillConfig(label_strategies=("explicit", "metadata"))
    started = time.monotonic()
    (result,) = backfill.run(url, [TENANT], config, Silent())
    print(f"backfill with metadata: {result.status} in {time.monotonic() - started:.1f} s")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--database", default=DB, help="scratch database, dropped and created")
    args = parser.parse_args()
    with server.provide(durable=True) as srv:
        url = prepare(srv.url, args.products, args.database)
        with psycopg.connect(url, autocommit=True) as conn:
            for pid in (1, args.products // 2, args.products):
                with conn.transaction():
                    started = time.monotonic()
                    moved = label_heuristics.refresh_product(conn, TENANT, pid)
                    took = (time.monotonic() - started) * 1000
                print(f"refresh_product {pid}: {took:.1f} ms (label moved: {moved})")
            for size in (1000, 5000):
                started = time.monotonic()
                moved_n = label_heuristics.refresh_tenant(conn, TENANT, batch_size=size)
                took = time.monotonic() - started
                print(f"refresh_tenant, batches of {size:,}: {took:.1f} s for "
                      f"{args.products:,} products (labels moved: {moved_n})")  # fmt: skip
            evidence = label_evidence.import_legacy(conn)
            started = time.monotonic()
            cal = label_heuristics.calibrate(conn, [TENANT])
            took = time.monotonic() - started
            print(f"calibrate: {took:.1f} s on {cal.labels:,} labels and {cal.photos:,} "
                  f"photos ({evidence.read:,} evidence rows, {args.products:,} "
                  f"products)")  # fmt: skip
        admin_url = server.with_database(srv.url, "postgres")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(args.database)))


if __name__ == "__main__":
    main()
