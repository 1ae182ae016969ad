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
   Inline and deferred mode run twice each: ``inline`` and ``deferred`` as after a
   backfill (the tenant's log complete, so an update's event carries ``after`` only),
   ``inline_pre`` and ``deferred_pre`` as before one (their events keep ``before`` too,
   see cdc/sql/capture_v3.sql and capture_v5.sql). Before each slice of a mode that
   projects as it writes, the table is brought back in step with the arrays, untimed
   (``resync``): the other modes' slices leave it behind, as production never does.
   ``inline_v2`` is inline mode with capture v2's triggers (statement-level, the diff on
   every write), the shape before capture v5, for comparison in the same rounds.
   ``inline_m3`` is ``inline`` with the canonical mapping before the current one
   (mapping_v3.sql, reinstalled for its slices and replaced again after them).
   The workload: ``--clients`` processes, each with its own connection, in autocommit,
   each statement a single-row legacy UPDATE of ``products.images`` on a random product:
   swap the first two images (a reorder), append an image, or drop the last one.
   ``logical`` (dual_write, triggerless: cdc/logical.py) runs when the server is at
   ``wal_level = logical``; the embedded server is started so with ``--logical``. Its
   write path holds no trigger, so the WAL reader's pace is printed too: after each
   logical slice, the time to drain that slice's writes from the slot into the event log
   (outside the measured slice), as a rate and as a multiple of the writers' rate. The
   slot is drained before the slice as well, untimed: the WAL the other modes wrote meanwhile
   would otherwise be decoded in the timed drain. ``logical_live`` is the same mode with a
   reader draining every half second *during* the slice, on the same cores as the
   writers, as in production; it prints how much WAL was left unread when the slice ended.
3. Print transactions per second per mode (total statements / total time) and the
   ratios to ``none``. The deferred projector runs afterwards and its time is printed.

Two reference triggers run in the same rounds, to calibrate this machine against the
figures the capture issue quotes for its own ("a naive delete-and-reinsert trigger
measured 0.27x here and an insert-one-event trigger 0.80x"):

* ``ref_noop``: a row trigger (same ``UPDATE OF images`` and ``WHEN``) whose body only
  returns: what firing a PL/pgSQL row trigger costs at all, before it does anything;
* ``ref_event``: a row trigger whose body is one INSERT of the new value into the same
  ``image_events`` table (the least any trigger that keeps an event log can do);
* ``ref_min``: ``ref_event`` plus the one statement that keeps ``product_images`` in
  step with the bench's edit, told which edit it is by the arrays' lengths (one row
  inserted, one deleted, or two orders swapped; no mapping, no checks, no diff): the
  least any trigger that logs the event *and* projects it can do, so the floor under
  inline mode;
* ``ref_naive``: a row trigger that deletes the product's rows and re-inserts one per
  element (no event, no canonical mapping, table-only metadata lost).

``--ab`` runs, instead of the modes above, the deferred log trigger's versions as bench
row triggers in the same rounds: ``v2`` (capture v2's shared function), ``v3_before`` and
``v3_after`` (copies of capture v3's per-tenant function as before and after a backfill),
with ``ref_event``.

The embedded server keeps PostgreSQL's default durability here (fsync and synchronous
commit on, as in production; the test suite turns them off); a ``DATABASE_URL`` server is
used as configured, and the settings are printed.
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

from cdc import capture, logical, migrate, project, server, stage
from cdc.seed import SeedConfig, seed

TENANT = "user_1"
DB = "imgmig_capture_bench"
MODES = (
    "none",
    "inline",
    "inline_pre",
    "inline_v2",
    "inline_m3",
    "deferred",
    "deferred_pre",
    "ref_noop",
    "ref_event",
    "ref_min",
    "ref_naive",
)
# --ab: the deferred log trigger's versions side by side, each as a bench row trigger.
AB_MODES = ("none", "v2", "v3_before", "v3_after", "ref_event")
# The bench row trigger's function per mode; ref_* are bench.<mode>.
BENCH_FUNCTIONS = {
    "v2": sql.Identifier("imgmig", "log_products_row"),  # capture v2's shared function
    "v3_before": sql.Identifier("bench", "v3_before"),
    "v3_after": sql.Identifier("bench", "v3_after"),
    "ref_noop": sql.Identifier("bench", "ref_noop"),
    "ref_event": sql.Identifier("bench", "ref_event"),
    "ref_min": sql.Identifier("bench", "ref_min"),
    "ref_naive": sql.Identifier("bench", "ref_naive"),
}
TARGETS = {
    "inline": 0.6,
    "inline_pre": 0.6,
    "inline_v2": 0.6,
    "inline_m3": 0.6,
    "deferred": 0.85,
    "deferred_pre": 0.85,
    "logical": 0.85,
    "logical_live": 0.85,
}

# The reference triggers (bench only, in their own schema); one row trigger each.
REFERENCE_SQL = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE OR REPLACE FUNCTION bench.ref_noop() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION bench.ref_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO user_1.image_events (aggregateid, type, payload, tenant, source)
  VALUES (NEW.id::text, 'images.updated', NEW.images, 'user_1', 'legacy');
  RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION bench.ref_min() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  n_old integer := jsonb_array_length(OLD.images);
  n_new integer := jsonb_array_length(NEW.images);
BEGIN
  INSERT INTO user_1.image_events (aggregateid, type, payload, tenant, source)
  VALUES (NEW.id::text, 'images.updated', NEW.images, 'user_1', 'legacy');
  IF n_new = n_old + 1 THEN  -- the bench's append
    INSERT INTO user_1.product_images (product_id, url, "order", created_at)
    VALUES (NEW.id, NEW.images -> (-1) ->> 'url', n_old, now());
  ELSIF n_new = n_old - 1 THEN  -- its drop of the last image
    DELETE FROM user_1.product_images WHERE product_id = NEW.id AND "order" = n_new;
  ELSE  -- its swap of the first two
    UPDATE user_1.product_images SET "order" = 1 - "order", updated_at = now()
     WHERE product_id = NEW.id AND "order" IN (0, 1);
  END IF;
  RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION bench.ref_naive() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM user_1.product_images WHERE product_id = NEW.id;
  INSERT INTO user_1.product_images (product_id, url, "order", created_at)
  SELECT NEW.id, e.v ->> 'url', (e.n - 1)::int,
         coalesce((e.v ->> 'created_at')::timestamptz, now())
    FROM jsonb_array_elements(NEW.images) WITH ORDINALITY AS e(v, n);
  RETURN NULL;
END $$;
"""

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


def statement_rate(url: str, statements: int, max_id: int, seed: int) -> float:
    """Edits per second of one session in one transaction, rolled back: the trigger's own
    cost per statement, without the commit's flush or the other clients' contention."""
    rng = random.Random(seed)
    with psycopg.connect(url) as conn:
        for edit in EDITS:  # prepare each statement and warm the trigger's plans, untimed
            conn.execute(edit, (rng.randint(1, max_id),), prepare=True)
        started = time.perf_counter()
        for _ in range(statements):
            edit = EDITS[rng.randrange(len(EDITS))]
            conn.execute(edit, (rng.randint(1, max_id),), prepare=True)
        took = time.perf_counter() - started
        conn.rollback()
    return statements / took


def prepare(base_url: str, products: int, database: str = DB) -> str:
    """A fresh database: seeded, migrated, backfilled; returns its URL."""
    url = server.fresh_database(base_url, database)
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
        conn.execute(REFERENCE_SQL)
        if logical.unavailable(conn) is None:
            logical.prepare(conn)
        for before, name in ((True, "v3_before"), (False, "v3_after")):  # copies for --ab
            capture.install_log_function(conn, TENANT, before=before)
            conn.execute(
                sql.SQL("ALTER FUNCTION {}() SET SCHEMA bench").format(
                    sql.Identifier(TENANT, capture.LOG_FUNCTION)
                )
            )
            conn.execute(
                sql.SQL("ALTER FUNCTION {}() RENAME TO {}").format(
                    sql.Identifier("bench", capture.LOG_FUNCTION), sql.Identifier(name)
                )
            )
    return url


# Modes that project into product_images as they write: before their slices the table is
# brought back in step with products.images (untimed), which the slices of the modes that
# do not project (none, deferred, ...) leave behind. In production capture has run all
# along and the table is in step; inline capture's short cuts (capture v5) stand on that,
# and send a write whose rows they find out of step to the full diff.
RESYNCED = ("inline", "inline_pre", "inline_v2", "inline_m3", "ref_min")
# The canonical mapping's current and previous SQL files: inline_m3 runs with the
# previous one (mapping v3), every other mode with the current one.
MAPPINGS = tuple(name for name in capture.CURRENT_SQL if name.startswith("mapping_"))


def resync(url: str, products: int) -> None:
    """Project every product's current array with the diff (rows already right: no-op)."""
    products_table = sql.Identifier(TENANT, "products")
    with psycopg.connect(url, autocommit=True) as conn:
        for low in range(1, products + 1, 10_000):
            conn.execute(
                sql.SQL(
                    "SELECT imgmig.project(%s, array_agg(id ORDER BY id), "
                    "array_agg(images ORDER BY id)) FROM {} WHERE id BETWEEN %s AND %s"
                ).format(products_table),
                (TENANT, low, low + 9_999),
            )


def set_mode(url: str, mode: str) -> None:
    products = sql.Identifier(TENANT, "products")
    with psycopg.connect(url) as conn:
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS bench_ref ON {}").format(products))
        deferred = mode.startswith("deferred")
        if mode.startswith("logical"):
            # Straight to the mode, past set_projection's check that the tenant's log is
            # complete: the bench's own no-capture slices leave it incomplete on purpose.
            # The stage change below runs the real apply_stage (publication, triggers).
            conn.execute(
                "UPDATE imgmig.tenant_state SET projection = 'logical' WHERE tenant = %s",
                (TENANT,),
            )
            conn.commit()
            # Untimed: read past the other modes' WAL, which a reader draining all along
            # would have read as it came; the timed drain then reads this slice's only.
            with psycopg.connect(url, autocommit=True) as reader:
                logical.drain(reader)
        else:
            project.set_mode(conn, TENANT, "deferred" if deferred else "inline")
        capture.install_sql(conn, MAPPINGS[-2:-1] if mode == "inline_m3" else MAPPINGS[-1:])
        target = "dual_write" if mode in TARGETS else "jsonb"
        stage.set_stage(conn, TENANT, target, reason="benchmark", actor="bench", force=True)
        if deferred:  # after a backfill (the log complete: updates log 'after'), or before
            capture.install_log_function(conn, TENANT, before=mode == "deferred_pre")
        if mode.startswith("inline"):  # the same for inline mode (capture v5)
            capture.install_capture_function(conn, TENANT, before=mode == "inline_pre")
            # v2's statement-level diff triggers for inline_v2, v5's for the others: by name,
            # set_stage keeps a trigger of the right name whichever mode left it there
            specs = capture.CAPTURE_V2 if mode == "inline_v2" else capture.CAPTURE
            for spec in specs:
                conn.execute(spec.create(TENANT, replace=True))
        if mode in BENCH_FUNCTIONS:
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER bench_ref AFTER UPDATE OF images ON {} FOR EACH ROW "
                    "WHEN (OLD.images IS DISTINCT FROM NEW.images) EXECUTE FUNCTION {}()"
                ).format(products, BENCH_FUNCTIONS[mode])
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--database", default=DB, help="scratch database, dropped and created")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--ab",
        action="store_true",
        help="compare the deferred trigger's versions instead (v2, v3 with/without before)",
    )
    parser.add_argument(
        "--statements",
        type=int,
        default=0,
        help="instead of concurrent clients, time this many edits per slice in one session "
        "and one transaction rolled back (the triggers' cost per statement, less noisy)",
    )
    parser.add_argument(
        "--logical",
        action="store_true",
        help="start the embedded server at wal_level=logical (adds the logical mode)",
    )
    args = parser.parse_args()
    modes = AB_MODES if args.ab else MODES
    with server.provide(os.environ.get("DATABASE_URL"), durable=True, logical=args.logical) as srv:
        print(f"server: {srv.kind}; preparing {args.products} products ...", flush=True)
        url = prepare(srv.url, args.products, args.database)
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            durability = conn.execute(
                "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) "
                "FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'wal_level')"
            ).fetchone()
            why_not = logical.unavailable(conn)
        if not args.ab and why_not is None and not args.statements:
            modes = (*modes, "logical", "logical_live")
        elif not args.ab:
            print(f"logical mode skipped: {why_not}", flush=True)
        done: dict[str, list[float]] = {mode: [] for mode in modes}
        drains: list[tuple[float, float]] = []  # (writes drained per second, writers' rate)
        behind: list[int] = []  # logical_live: bytes the live reader had left at the end
        applied, took = 0, 0.0  # the deferred slices' backlogs, projected after each
        for turn in range(args.rounds):
            for mode in modes:
                set_mode(url, mode)
                if mode in RESYNCED and not args.statements:  # rolled back: still in step
                    resync(url, args.products)
                slice_s = args.seconds / args.rounds
                reader = live_reader(url, slice_s) if mode == "logical_live" else None
                rate = (
                    statement_rate(url, args.statements, args.products, seed=turn)
                    if args.statements
                    else run_phase(url, clients=args.clients, seconds=slice_s, max_id=args.products)
                )
                done[mode].append(rate)
                print(f"round {turn + 1} {mode:9s} {rate:9.0f} tx/s", flush=True)
                if mode.startswith("deferred") and not args.statements:
                    # The projector on this slice's backlog, timed apart (the switch to
                    # inline mode would apply it too, untimed, in its own transaction).
                    started = time.monotonic()
                    with psycopg.connect(url, autocommit=True) as conn:
                        applied += project.project(conn, TENANT)
                    took += time.monotonic() - started
                if mode == "logical":
                    drains.append((drain_pace(url), rate))
                if reader is not None:
                    behind.append(reader_behind(url, reader))
        tps = {mode: sum(rates) / len(rates) for mode, rates in done.items()}
        print(
            f"\nPostgreSQL {version[0] if version else '?'} "
            f"({durability[0] if durability else '?'}), {args.products} products, "
            + (
                f"{args.statements} statements per mode and round in one session, rolled back"
                if args.statements
                else f"{args.clients} clients, {args.seconds:.0f} s per mode in "
                f"{args.rounds} rounds"
            )
        )
        print_rates(tps, modes, per_statement=bool(args.statements))
        print(f"projector caught up {applied} products in {took:.1f} s")
        print_readers(drains, behind)


def print_rates(tps: dict[str, float], modes: tuple[str, ...], *, per_statement: bool) -> None:
    """Each mode's rate and its ratio to ``none``; with ``--statements``, µs per statement."""

    def cost(mode: str) -> str:
        return f"  {1e6 / tps[mode]:5.0f} us/statement" if per_statement else ""

    print(f"no trigger  {tps['none']:9.0f} tx/s{cost('none')}")
    for mode in modes[1:]:
        ratio = tps[mode] / tps["none"]
        target = TARGETS.get(mode)
        verdict = (
            f"({'meets' if ratio >= target else 'below'} the {target}x target)"
            if target
            else "(reference)"
        )
        print(f"{mode:10s}  {tps[mode]:9.0f} tx/s  {ratio:5.2f}x  {verdict}{cost(mode)}")


def print_readers(drains: list[tuple[float, float]], behind: list[int]) -> None:
    """The WAL reader's figures: its pace alone, and what the live reader left unread."""
    if drains:
        pace = sum(p for p, _ in drains) / len(drains)
        writers = sum(r for _, r in drains) / len(drains)
        print(
            f"WAL reader: {pace:.0f} writes/s drained into the event log, "
            f"{pace / writers:.1f}x the writers' {writers:.0f} tx/s"
        )
    if behind:
        print(
            f"live reader: at most {max(behind) / 2**20:.1f} MiB of WAL left unread at the "
            "end of a slice"
        )


def _read_until(url: str, deadline: float) -> None:
    """The live reader: drain the slot every half second until ``deadline``."""
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            logical.drain(conn)
            time.sleep(0.5)


def live_reader(url: str, seconds: float) -> mp.Process:
    """Start a reader draining beside the writers for ``seconds``."""
    proc = mp.Process(target=_read_until, args=(url, time.monotonic() + seconds))
    proc.start()
    return proc


def reader_behind(url: str, reader: mp.Process) -> int:
    """Stop the live reader; print and return how much WAL it had left to read."""
    reader.join()
    with psycopg.connect(url, autocommit=True) as conn:
        lag = logical.lag(conn)
        left = lag.bytes if lag is not None else 0
        drained = logical.drain(conn)  # what it had left, untimed
    print(f"        live reader left {left / 2**20:.1f} MiB, {drained.transactions} writes")
    return left


def drain_pace(url: str) -> float:
    """Drain the slot (the logical slice's writes); returns writes logged per second."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.monotonic()
        drained = logical.drain(conn)
        pace = drained.transactions / (time.monotonic() - started)
    print(f"        reader drained {drained.transactions} writes: {pace:.0f}/s", flush=True)
    return pace


if __name__ == "__main__":
    main()
