"""Backfill benchmark: throughput against a raw INSERT, writer latency, peak RSS.

One command (against DATABASE_URL, else a throwaway embedded PostgreSQL):

    .venv/bin/python bench/backfill_bench.py --products 1000000

1. Create a scratch database, seed ``--products`` products over 4 tenants, migrate,
   and move the tenants to ``dual_write`` (capture on, as during a real backfill).
2. Raw baseline: per tenant, one ``INSERT … SELECT jsonb_array_elements`` into the
   tenant's indexed ``product_images`` (no canonical mapping, no events, no locks).
   Rows per second over all tenants. Then TRUNCATE the tables.
3. ``CHECKPOINT``, then idle writers: ``--writers`` threads, each a single-row legacy UPDATE of
   ``products.images`` (through the capture trigger) every 20 ms, for ``--idle-s``.
4. Backfill: ``imgmig backfill --all`` as a subprocess (its own RSS is sampled every
   100 ms with psutil) while the same writers run; rows per second from the checkpoint.
5. ``CHECKPOINT``, then the idle writers again for ``--idle-s``: the idle p99 moved by half
   between runs of the same code (11.8 to 18.3 ms), so the ratio divides by the p99 of
   both idle windows together, and prints each.
6. Raw baseline again, on the emptied tables: the raw rate moves by ±20% between runs
   (checkpoints), so the ratio uses the mean of the two, and both are printed.
7. ``CHECKPOINT``, then the raw statement a third time, with the writers running: their p99
   during it ÷ idle is the same ratio for the issue's own throughput reference, which
   takes no lock and logs no event: what writing these rows at that rate costs the
   writers, whatever writes them. The reference for the backfill's own p99 ratio. With
   ``--workers`` > 1, a fourth time, the tenants' statements in that many connections at
   once, as the backfill's workers run: the same for as many busy server processes.
8. Print: backfill ÷ raw throughput, writer p99 during ÷ idle, peak RSS of the backfill,
   and the WAL each wrote per image row (what standbys and logical consumers must apply;
   the backfill's includes the concurrent writers' few MB), and from ``pg_stat_wal`` over
   the backfill's window its full-page images and how often a backend found the WAL
   buffers full (and so wrote them out itself).
9. ``--repeat N`` runs steps 3-8 N times in the same database (the tenants backfilled
   again with ``--restart`` on the emptied tables), each raw measurement serving as the
   "after" of one backfill and the "before" of the next, and ends with the median of each
   ratio and how many repetitions met both targets. One run of either ratio moved by a
   fifth between runs of the same code on this machine; a median of several in one run
   is the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass

import psutil
import psycopg
from psycopg import sql

from cdc import migrate, server, stage
from cdc.pacing import DEFAULT_TARGET_MS
from cdc.seed import SeedConfig, seed

DB = "imgmig_backfill_bench"
# The backfill issue's targets: throughput at least this share of the raw statement's...
THROUGHPUT_TARGET = 0.8
# ... while the writers' p99 during the backfill stays within this multiple of idle.
P99_TARGET = 2.0

RAW = """
INSERT INTO {images} (product_id, url, "order", created_at)
SELECT p.id, e.v ->> 'url', (e.n - 1)::int,
       coalesce((e.v ->> 'created_at')::timestamptz, now())
  FROM {products} p CROSS JOIN LATERAL jsonb_array_elements(p.images) WITH ORDINALITY AS e(v, n)
 WHERE jsonb_typeof(e.v -> 'url') = 'string'
"""

WRITE = (
    "UPDATE {products} SET images = jsonb_set(images, '{{0,alt_text}}', "
    "to_jsonb(md5(random()::text))) WHERE id = %s"
)


def prepare(url: str, products: int) -> dict[str, int]:
    started = time.monotonic()
    with psycopg.connect(url) as conn:
        counts = seed(conn, SeedConfig(products=products, labels=products // 5, seed=1))
    tenants = {t: n for t, n in counts.items() if n}
    # Vacuum now, so autovacuum does not hold the tables while the migration takes its
    # brief DDL locks (lock_timeout 500 ms < deadlock_timeout 1 s: DDL would give up
    # before PostgreSQL cancels the autovacuum) and so both runs start from the same state.
    with psycopg.connect(url, autocommit=True) as conn:
        for tenant in tenants:
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(tenant, "products")))
    migrate.upgrade(url)
    with psycopg.connect(url) as conn:
        for tenant in tenants:
            stage.set_stage(conn, tenant, "dual_write", reason="benchmark")
        conn.commit()
    print(f"seeded and migrated {products:,} products in {time.monotonic() - started:.0f} s")
    return tenants


def wal_position(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        return str(row[0]) if row else "0/0"


def wal_since(url: str, start: str) -> int:
    """Bytes of WAL written since ``start``."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)::bigint", (start,)
        ).fetchone()
        return int(row[0]) if row else 0


def wal_counters(url: str) -> tuple[int, int]:
    """``pg_stat_wal``'s full-page images and times a backend found the WAL buffers full
    (both cumulative; PostgreSQL 14 onwards)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT wal_fpi, wal_buffers_full FROM pg_stat_wal").fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)


def raw_baseline(
    url: str, tenants: dict[str, int], writers: Writers | None = None, connections: int = 1
) -> tuple[int, float, list[float]]:
    """The raw statement per tenant, timed; then the tables emptied.

    With ``writers``, they run while it does (after a ``CHECKPOINT``, as for the idle
    windows) and their latencies are returned: what writing these rows at the raw
    statement's own rate, with no lock and no event, does to them. (``product_id,
    "order"`` is not unique, so the rows the writers' capture projects meanwhile only
    add duplicates, emptied with the rest.) ``connections`` > 1 runs the tenants' statements
    that many at a time, each connection taking the next tenant, as the backfill's workers do.
    """
    if writers is not None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        writers.start()
    queue = list(tenants)
    counts: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def insert_all() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                while True:
                    with lock:
                        if not queue:
                            return
                        tenant = queue.pop(0)
                    stmt = sql.SQL(RAW).format(
                        images=sql.Identifier(tenant, "product_images"),
                        products=sql.Identifier(tenant, "products"),
                    )
                    counts.append(conn.execute(stmt).rowcount)
        except BaseException as exc:  # re-raised by the caller, after the writers stop
            failures.append(exc)

    started = time.monotonic()
    wal_start = wal_position(url)
    threads = [threading.Thread(target=insert_all) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - started
    latencies = writers.finish() if writers is not None else []
    if failures:
        raise failures[0]
    rows = sum(counts)
    wal = wal_since(url, wal_start)
    print(f"  raw WAL: {wal / 2**20:,.0f} MiB, {wal / max(rows, 1):,.0f} bytes per row")
    empty(url, tenants)
    return rows, took, latencies


def empty(url: str, tenants: dict[str, int]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for tenant in tenants:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(tenant, "product_images")))


class Writers:
    """Single-row legacy writers; latencies in ms, per phase."""

    def __init__(self, url: str, tenants: dict[str, int], n: int) -> None:
        self.url, self.tenants, self.n = url, tenants, n
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the writers; returns once each is connected, about to write."""
        self.stop.clear()
        self.latencies = []
        ready = threading.Barrier(self.n + 1)
        self.threads = [threading.Thread(target=self._loop, args=(i, ready)) for i in range(self.n)]
        for t in self.threads:
            t.start()
        ready.wait(timeout=60)

    def finish(self) -> list[float]:
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.latencies

    def _loop(self, seed_no: int, ready: threading.Barrier) -> None:
        rng = random.Random(seed_no)
        names = list(self.tenants)
        try:
            conn = psycopg.connect(self.url, autocommit=True)
        except BaseException:
            ready.abort()  # start() raises BrokenBarrierError instead of waiting forever
            raise
        with conn:
            ready.wait()
            while True:  # at least one write each, however short the window
                tenant = rng.choice(names)
                stmt = sql.SQL(WRITE).format(products=sql.Identifier(tenant, "products"))
                began = time.perf_counter()
                conn.execute(stmt, (rng.randint(1, self.tenants[tenant]),))
                self.latencies.append((time.perf_counter() - began) * 1000)
                if self.stop.wait(0.02):
                    return


def idle_window(url: str, writers: Writers, seconds: float) -> list[float]:
    """The writers' latencies with no backfill running, after a ``CHECKPOINT``.

    The raw statement and the backfill leave gigabytes of dirty buffers: flushed first, or
    the checkpointer's writes land in the window and inflate the baseline (one run
    measured an idle p99 of 43 ms instead of 9 ms that way).
    """
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    writers.start()
    time.sleep(seconds)
    return writers.finish()


def table_rows(url: str, tenants: dict[str, int]) -> int:
    with psycopg.connect(url) as conn:
        total = 0
        for tenant in tenants:
            query = sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(tenant, "product_images")
            )
            row = conn.execute(query).fetchone()
            total += int(row[0]) if row else 0
        return total


def percentiles(values: list[float]) -> list[float]:
    """The 99 cut points of ``values`` (one write: itself, 99 times)."""
    return statistics.quantiles(values, n=100) if len(values) > 1 else values * 99


def p99(values: list[float]) -> float:
    return percentiles(values)[98]


def run_backfill(url: str, args: argparse.Namespace, *, restart: bool) -> tuple[float, float, str]:
    """Backfill as a subprocess; return (seconds, peak RSS MiB, last log line)."""
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", url,
           "backfill", "--all", "--workers", str(args.workers),
           "--target-ms", str(args.target_ms), "--fk-check", args.fk_check]  # fmt: skip
    if args.max_rate is not None:
        cmd += ["--max-rate", str(args.max_rate)]
    if restart:  # a repetition: the tenants are done, their tables emptied since
        cmd.append("--restart")
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - our own CLI, arguments built above
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    ps = psutil.Process(proc.pid)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []))
    reader.start()
    while proc.poll() is None:
        with suppress(psutil.Error):
            peak = max(peak, ps.memory_info().rss)
        time.sleep(0.1)
    reader.join()
    took = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"backfill failed ({proc.returncode}): {''.join(lines[-5:])}")
    return took, peak / 2**20, lines[-1].strip()


def describe(name: str, latencies: list[float]) -> None:
    cuts = percentiles(latencies)
    slow = sum(v > 100 for v in latencies) / len(latencies)
    print(f"writer latency {name}: p50 {cuts[49]:.1f} ms, p90 {cuts[89]:.1f} ms, "
          f"max {max(latencies):.0f} ms, over 100 ms {slow:.2%}")  # fmt: skip


@dataclass(frozen=True)
class Repetition:
    """One backfill between two raw measurements, and the writers around and during it."""

    throughput: float  # backfill rows/s ÷ the mean of the raw rates before and after it
    p99_ratio: float  # writers' p99 during the backfill ÷ over both idle windows
    raw_p99_ratio: float  # writers' p99 during the raw statement ÷ the same idle p99
    parallel_p99_ratio: float | None = None  # the same, the raw in --workers connections

    def met(self) -> bool:
        return self.throughput >= THROUGHPUT_TARGET and self.p99_ratio <= P99_TARGET


def repetition(
    url: str, tenants: dict[str, int], writers: Writers, raw_before: float,
    args: argparse.Namespace, *, restart: bool,
) -> tuple[Repetition, float]:  # fmt: skip
    """Idle window, backfill under the writers, idle window, raw again, then the raw
    statement under the writers (in one connection, and in ``--workers``); print them all.

    Returns the repetition and the raw rate measured after it (the next one's before)."""
    idle_before = idle_window(url, writers, args.idle_s)
    writers.start()
    wal_start, counters = wal_position(url), wal_counters(url)
    took, rss, last = run_backfill(url, args, restart=restart)
    busy = writers.finish()
    wal = wal_since(url, wal_start)
    fpi, buffers_full = (b - a for a, b in zip(counters, wal_counters(url), strict=True))
    idle_after = idle_window(url, writers, args.idle_s)
    idle = idle_before + idle_after
    assert json.loads(last)["exit_code"] == 0
    rows = table_rows(url, tenants)
    rate = rows / took
    print(f"backfill: {rows:,} rows in {took:.1f} s = {rate:,.0f} rows/s "
          f"(workers={args.workers}, target {args.target_ms} ms, max rate "
          f"{args.max_rate or 'none'}, fk-check {args.fk_check}, process start "
          f"included)")  # fmt: skip
    print(f"  backfill WAL: {wal / 2**20:,.0f} MiB, {wal / max(rows, 1):,.0f} bytes per row "
          f"(the writers' included); {fpi:,} full-page images, WAL buffers found full "
          f"{buffers_full:,} times")  # fmt: skip
    empty(url, tenants)
    again_rows, again_s, _ = raw_baseline(url, tenants)
    raw_after = again_rows / again_s
    print(f"raw INSERT…SELECT again: {again_rows:,} rows in {again_s:.1f} s = "
          f"{raw_after:,.0f} rows/s")  # fmt: skip
    mean_raw = (raw_before + raw_after) / 2
    print(f"throughput ratio backfill/raw: {rate / mean_raw:.2f} against the "
          f"mean raw rate ({rate / raw_before:.2f} and "
          f"{rate / raw_after:.2f} against each)")  # fmt: skip
    quiet, loaded = p99(idle), p99(busy)
    print(f"writer p99 idle {quiet:.1f} ms ({len(idle)} writes; before the backfill "
          f"{p99(idle_before):.1f}, after {p99(idle_after):.1f}), during backfill "
          f"{loaded:.1f} ms ({len(busy)} writes): ratio {loaded / quiet:.2f}")  # fmt: skip
    describe("idle", idle)
    describe("during backfill", busy)
    references = [raw_reference(url, tenants, writers, quiet, 1)]
    if args.workers > 1:
        references.append(raw_reference(url, tenants, writers, quiet, args.workers))
    print(f"backfill peak RSS: {rss:.0f} MiB")
    return Repetition(rate / mean_raw, loaded / quiet, *references), raw_after


def raw_reference(
    url: str, tenants: dict[str, int], writers: Writers, quiet: float, connections: int
) -> float:
    """The raw statement in ``connections`` under the writers; their p99 ratio to ``quiet``."""
    rows, took, under = raw_baseline(url, tenants, writers, connections)
    ratio = p99(under) / quiet
    print(f"raw INSERT…SELECT in {connections} connection(s) under the writers: "
          f"{rows / took:,.0f} rows/s; writer p99 during it {p99(under):.1f} ms "
          f"({len(under)} writes): ratio {ratio:.2f}")  # fmt: skip
    describe(f"during the raw statement in {connections} connection(s)", under)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--database", default=DB, help="scratch database, dropped and created")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=15.0)
    parser.add_argument("--target-ms", type=int, default=DEFAULT_TARGET_MS)
    parser.add_argument("--fk-check", choices=("auto", "always"), default="auto")
    parser.add_argument(
        "--max-rate", type=float, help="the backfill's --max-rate: image rows/s per tenant"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="backfills in this run, each between two raw measurements (the raw after one "
        "is the raw before the next); prints each, then the medians",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    with server.provide(durable=True) as srv:
        url = server.fresh_database(srv.url, args.database)
        tenants = prepare(url, args.products)
        raw_rows, raw_s, _ = raw_baseline(url, tenants)
        raw_rate = raw_rows / raw_s
        print(f"raw INSERT…SELECT: {raw_rows:,} rows in {raw_s:.1f} s = {raw_rate:,.0f} rows/s")
        writers = Writers(url, tenants, args.writers)
        reps: list[Repetition] = []
        for n in range(args.repeat):
            if args.repeat > 1:
                print(f"--- repetition {n + 1} of {args.repeat}")
            rep, raw_rate = repetition(url, tenants, writers, raw_rate, args, restart=n > 0)
            reps.append(rep)
        if args.repeat > 1:
            print(
                f"medians of {len(reps)}: throughput ratio "
                f"{statistics.median(r.throughput for r in reps):.2f} "
                f"({', '.join(f'{r.throughput:.2f}' for r in reps)}), writer p99 ratio "
                f"{statistics.median(r.p99_ratio for r in reps):.2f} "
                f"({', '.join(f'{r.p99_ratio:.2f}' for r in reps)}); both targets met in "
                f"{sum(r.met() for r in reps)} of {len(reps)}; writer p99 ratio during the "
                f"raw statement {statistics.median(r.raw_p99_ratio for r in reps):.2f} "
                f"({', '.join(f'{r.raw_p99_ratio:.2f}' for r in reps)})"
            )
            parallel = [r.parallel_p99_ratio for r in reps if r.parallel_p99_ratio is not None]
            if parallel:
                print(
                    f"writer p99 ratio during the raw statement in {args.workers} "
                    f"connections: median {statistics.median(parallel):.2f} "
                    f"({', '.join(f'{r:.2f}' for r in parallel)})"
                )


if __name__ == "__main__":
    main()
