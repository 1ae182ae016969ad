"""Capture overhead benchmark: legacy single-row image updates, with and without capture.

One command (against DATABASE_URL, else a throwaway embedded PostgreSQL):

    .venv/bin/python bench/capture_bench.py --products 100000 --seconds 20

1. Create a scratch database, seed one tenant with ``--products`` products (2-8 images
   each), migrate it, and project every product into product_images (a backfill), so
   the capture diff works against a full table as it would in production.
2. Run the same workload in each mode, in the same run: ``none`` (stage jsonb: no
   trigger), ``inline`` (dual_write, inline projection), ``deferred`` (dual_write, the
   trigger appends the event only). The modes take turns in ``--rounds`` slices of
   ``--seconds / --rounds`` each, so load drifting on a shared machine hits all alike.
   The workload: ``--clients`` processes, each with its own connection, in autocommit,
   each statement a single-row legacy UPDATE of ``products.images`` on a random product:
   swap the first two images (a reorder), append an image, or drop the last one.
3. Print transactions per second per mode (total statements / total time) and the
   ratios to ``none``. The deferred projector runs afterwards and its time is printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc import migrate, project, server, stage
from cdc.seed import SeedConfig, seed

TENANT = "user_1"
DB = "imgmig_capture_bench"
MODES = ("none", "inline", "deferred")

# Three legacy edits, chosen at random per statement, each a whole-array rewrite.
EDITS: tuple[sql.Composed, ...] = tuple(
    sql.SQL(text).format(products=sql.Identifier(TENANT, "products"))
    for text in (
        # reorder: swap the first two images and renumber them
        "UPDATE {products} SET images = jsonb_set(jsonb_set(images, '{{0}}', "
        "(images -> 1) || '{{\"order\": 0}}'), '{{1}}', (images -> 0) || '{{\"order\": 1}}') "
        "WHERE id = %s",
        # append an image at the end
        "UPDATE {products} SET images = images || jsonb_build_array(jsonb_build_object("
        "'url', 'https://cdn.example/bench/' || md5(random()::text) || '.jpg', "
        "'order', jsonb_array_length(images), 'created_at', '2026-01-01T00:00:00.000000Z')) "
        "WHERE id = %s",
        # drop the last image, keeping at least two
        "UPDATE {products} SET images = CASE WHEN jsonb_array_length(images) > 2 "
        "THEN images - (jsonb_array_length(images) - 1) ELSE images END WHERE id = %s",
    )
)


@dataclass(frozen=True)
class Job:
    url: str
    seconds: float
    max_id: int
    seed: int


def worker(job: Job, results: mp.Queue[int]) -> None:
    """Run single-row updates for ``job.seconds``; report how many committed."""
    rng = random.Random(job.seed)
    done = 0
    with psycopg.connect(job.url, autocommit=True) as conn:
        deadline = time.monotonic() + job.seconds
        while time.monotonic() < deadline:
            edit = EDITS[rng.randrange(len(EDITS))]
            conn.execute(edit, (rng.randint(1, job.max_id),), prepare=True)
            done += 1
    results.put(done)


def run_phase(url: str, *, clients: int, seconds: float, max_id: int) -> float:
    """Transactions per second of ``clients`` concurrent writers."""
    results: mp.Queue[int] = mp.Queue()
    procs = [
        mp.Process(target=worker, args=(Job(url, seconds, max_id, n * 7919 + 1), results))
        for n in range(clients)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    total = sum(results.get() for _ in procs)
    for p in procs:
        p.join()
    return total / (time.monotonic() - started)


def prepare(base_url: str, products: int) -> str:
    """A fresh database: seeded, migrated, backfilled; returns its URL."""
    with psycopg.connect(server.with_database(base_url, "postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    url = server.with_database(base_url, DB)
    with psycopg.connect(url) as conn:
        seed(conn, SeedConfig(tenants=1, products=products, labels=products // 5, seed=1))
    migrate.upgrade(url, tenants=[TENANT])
    with psycopg.connect(url, autocommit=True) as conn:
        for low in range(1, products + 1, 10_000):
            conn.execute(
                "SELECT imgmig.snapshot(%s, ARRAY(SELECT generate_series(%s::bigint, %s)), "
                "'backfill')",
                (TENANT, low, low + 9_999),
            )
        # The snapshots above are projected already: start the projector's checkpoint here.
        conn.execute(
            "INSERT INTO imgmig.projector_checkpoint (tenant, last_xmin, last_seq) "
            "SELECT %s, pg_snapshot_xmin(pg_current_snapshot())::text::bigint, "
            "(SELECT max(seq) FROM user_1.image_events)",
            (TENANT,),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TENANT, "products")))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TENANT, "product_images")))
    return url


def set_mode(url: str, mode: str) -> None:
    with psycopg.connect(url) as conn:
        project.set_mode(conn, TENANT, "deferred" if mode == "deferred" else "inline")
        target = "jsonb" if mode == "none" else "dual_write"
        stage.set_stage(conn, TENANT, target, reason="benchmark", actor="bench", force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with server.provide(os.environ.get("DATABASE_URL")) as srv:
        print(f"server: {srv.kind}; preparing {args.products} products ...", flush=True)
        url = prepare(srv.url, args.products)
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        done: dict[str, list[float]] = {mode: [] for mode in MODES}
        for turn in range(args.rounds):
            for mode in MODES:
                set_mode(url, mode)
                slice_s = args.seconds / args.rounds
                rate = run_phase(url, clients=args.clients, seconds=slice_s, max_id=args.products)
                done[mode].append(rate)
                print(f"round {turn + 1} {mode:9s} {rate:9.0f} tx/s", flush=True)
        started = time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            applied = project.project(conn, TENANT)
        took = time.monotonic() - started
        tps = {mode: sum(rates) / len(rates) for mode, rates in done.items()}
        print(
            f"\nPostgreSQL {version[0] if version else '?'}, {args.products} products, "
            f"{args.clients} clients, {args.seconds:.0f} s per mode in {args.rounds} rounds"
        )
        print(f"no trigger  {tps['none']:9.0f} tx/s")
        for mode, target in (("inline", 0.6), ("deferred", 0.85)):
            ratio = tps[mode] / tps["none"]
            verdict = "meets" if ratio >= target else "below"
            print(
                f"{mode:10s}  {tps[mode]:9.0f} tx/s  {ratio:5.2f}x  "
                f"({verdict} the {target}x target)"
            )
        print(f"projector caught up {applied} products in {took:.1f} s")


if __name__ == "__main__":
    main()
