"""Logical (triggerless) capture: the WAL reader logs what the deferred trigger would.

These tests need ``wal_level = logical``, which neither the test server nor the
PostgreSQL 15 service has: they run on a private embedded server started for this module
(the refusal test also asks the shared server, which says why it cannot).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from cdc import (
    backfill,
    capture,
    deploy,
    logical,
    migrate,
    pgoutput,
    project,
    reconcile,
    runs,
    server,
)
from cdc.errors import DeployStoppedError, LogicalCaptureError
from cdc.progress import Silent
from cdc.seed import SeedConfig, seed
from tests.backfill_helpers import exact_mismatches, scalar
from tests.capture_support import (
    TENANT,
    Conn,
    count,
    events_of,
    go,
    img,
    in_sync,
    new_product,
    table,
    write_images,
)

A, B, C = (f"https://cdn.example/{x}.jpg" for x in "abc")
PRODUCTS = 300
TEMPLATE = "imgmig_logical_template"


@pytest.fixture(scope="module")
def logical_server() -> Iterator[str]:
    """A private embedded server at wal_level=logical, with a template database: one
    tenant seeded, migrated, in dual_write (deferred) and backfilled (its log complete)."""
    with server.ephemeral_embedded(logical=True) as srv:
        url = server.fresh_database(srv.url, TEMPLATE)
        with psycopg.connect(url) as c:
            seed(c, SeedConfig(tenants=1, products=PRODUCTS, labels=30, seed=5))
        migrate.upgrade(url, tenants=[TENANT])
        with psycopg.connect(url) as c:
            with c.transaction():
                project.set_mode(c, TENANT, "deferred")
            go(c, "dual_write")
        backfill.run(url, [TENANT], backfill.BackfillConfig(workers=1), Silent())
        yield srv.url


@pytest.fixture
def lurl(logical_server: str) -> Iterator[str]:
    """A fresh copy of the template; its slot is dropped before the database is."""
    name = f"imgmig_logical_{random.randrange(10**9)}"
    with psycopg.connect(logical_server, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE)
            )
        )
    url = server.with_database(logical_server, name)
    try:
        yield url
    finally:
        with psycopg.connect(logical_server, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s",
                (name,),
            )
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def lconn(lurl: str) -> Iterator[Conn]:
    with psycopg.connect(lurl, autocommit=True) as c:
        yield c


def test_writes_reach_the_log_through_the_wal_not_a_trigger(lconn: Conn, lurl: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cdc",
            "--database-url",
            lurl,
            "project",
            "--tenant",
            TENANT,
            "--mode",
            "logical",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"capture slot {logical.slot_name(lconn)} created" in done.stdout
    assert capture.installed_triggers(lconn, TENANT) == set()  # nothing on the write path
    assert logical.published(lconn) == {TENANT}

    pid = new_product(lconn, [img(A, 0)])
    write_images(lconn, pid, [img(A, 0), img(B, 1)])
    lconn.execute(
        sql.SQL("UPDATE {} SET title = 'renamed' WHERE id = %s").format(table(TENANT, "products")),
        (pid,),
    )
    write_images(lconn, pid, [img(A, 0), img(B, 1)])  # the same array again
    with lconn.transaction():  # the service says who it is
        lconn.execute("SELECT pg_logical_emit_message(true, 'imgmig.source', 'service')")
        write_images(lconn, pid, [img(B, 0), img(A, 1)])
    with lconn.transaction(force_rollback=True):
        write_images(lconn, pid, [img(C, 0)])
    gone = new_product(lconn, [img(C, 0)], sku="T-2")
    lconn.execute(
        sql.SQL("DELETE FROM {} WHERE id = %s").format(table(TENANT, "products")), (gone,)
    )

    bad = new_product(lconn, {"not": "an array"}, sku="T-3")  # bad input is logged too
    write_images(lconn, bad, None)  # a JSON null

    assert events_of(lconn, pid) == []  # nothing logged by the writes themselves
    behind = project.lag(lconn, TENANT)
    assert behind.wal_bytes is not None
    assert behind.wal_bytes > 0

    project.project(lconn, TENANT)
    logged = events_of(lconn, pid)
    shown = subprocess.run(
        [sys.executable, "-m", "cdc", "--database-url", lurl, "flag", "get", "--tenant", TENANT],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    assert "logical" in shown
    assert "0 events; slot" in shown  # the lag column names the slot's distance
    assert [(kind, source) for kind, _, source in logged] == [
        ("images.inserted", "legacy"),
        ("images.updated", "legacy"),
        ("images.updated", "service"),
    ]
    assert [e[1]["after"] for e in logged] == [
        [img(A, 0)],
        [img(A, 0), img(B, 1)],
        [img(B, 0), img(A, 1)],
    ]
    assert all(isinstance(e[1]["wal"]["xid"], int) for e in logged)
    assert "before" not in logged[1][1]
    assert [kind for kind, _, _ in events_of(lconn, gone)] == ["images.inserted", "images.deleted"]
    assert in_sync(lconn, pid)
    assert exact_mismatches(lconn, TENANT) == 0
    assert project.lag(lconn, TENANT).pending == 0
    kinds = [(kind, payload.get("after", "-")) for kind, payload, _ in events_of(lconn, bad)]
    assert ("images.inserted", {"not": "an array"}) in kinds
    assert ("images.updated", None) in kinds
    assert [k for k, _ in kinds].count("images.malformed") == 2  # the projector's check


def test_a_drain_cut_short_after_its_commit_logs_nothing_twice(lconn: Conn) -> None:
    """The crash window: events and checkpoint committed, slot not advanced yet. The
    next drain re-reads those transactions from the slot and skips them."""
    project.switch(lconn, TENANT, "logical")
    pid = new_product(lconn, [img(A, 0)])
    write_images(lconn, pid, [img(B, 0)])
    with lconn.transaction():  # inside a transaction a drain never advances the slot
        first = logical.drain(lconn)
    assert first.transactions == 2
    before = count(lconn, TENANT, "image_events")
    again = logical.drain(lconn)
    assert again.transactions == 0
    assert count(lconn, TENANT, "image_events") == before
    assert len(events_of(lconn, pid)) == 2
    slot = logical.lag(lconn)
    assert slot is not None
    assert slot.bytes < 64 * 1024  # advanced past them now


def test_every_write_is_logged_once_and_in_order_across_mode_switches(
    lconn: Conn, lurl: str
) -> None:
    """A writer gives three products a new image per write (its url numbered in commit
    order) while the tenant goes deferred -> logical -> inline -> logical -> deferred, each
    switch followed by 0.3 s of writes before the next drain. Each product's events must
    then hold its numbers increasing in seq order, and all written numbers once: no write
    lost, none logged twice, none logged after a later one. (The triggers of a tenant
    leaving logical mode would log the writes after the switch before a drain logs the
    ones before it, were the slot not drained inside the switch.) The table ends exact."""
    ids = [
        int(r[0])
        for r in lconn.execute(
            sql.SQL("SELECT id FROM {} ORDER BY id LIMIT 3").format(table(TENANT, "products"))
        )
    ]
    start = int(
        scalar(lconn, sql.SQL("SELECT max(seq) FROM {}").format(table(TENANT, "image_events")))
    )
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:
        rng = random.Random(3)
        with psycopg.connect(lurl, autocommit=True) as w:
            n = 0
            while not stop.is_set():
                pid, url = rng.choice(ids), f"https://cdn.example/w/{n}.jpg"
                w.execute(
                    sql.SQL(
                        "UPDATE {} SET images = jsonb_build_array(jsonb_build_object("
                        "'url', %s::text, 'order', 0, "
                        "'created_at', '2025-03-01T12:00:00.000000Z')) WHERE id = %s"
                    ).format(table(TENANT, "products")),
                    (url, pid),
                )
                written.append(url)
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for mode in ("logical", "inline", "logical", "deferred"):
            stop.wait(0.4)
            if mode == "logical":
                logical.prepare(lconn)
            with lconn.transaction():
                project.set_mode(lconn, TENANT, mode)
            stop.wait(0.3)
            project.project(lconn, TENANT)
            logical.drop_slot_if_unused(lconn)
        stop.wait(0.4)
    finally:
        stop.set()
        thread.join()
    project.project(lconn, TENANT)
    assert len(written) > 50
    rows = lconn.execute(
        sql.SQL(
            "SELECT aggregateid, payload -> 'after' -> 0 ->> 'url' FROM {} "
            "WHERE seq > %s AND type = 'images.updated' ORDER BY seq"
        ).format(table(TENANT, "image_events")),
        (start,),
    ).fetchall()
    numbers: dict[str, list[int]] = {}
    for pid, url in rows:
        numbers.setdefault(str(pid), []).append(int(str(url).rsplit("/", 1)[1][:-4]))
    for pid, seen in numbers.items():
        assert seen == sorted(seen), (pid, seen)  # in commit order
    assert sorted(str(r[1]) for r in rows) == sorted(written)  # each write once
    assert exact_mismatches(lconn, TENANT) == 0
    assert not logical.slot_exists(lconn)  # the last tenant out took the slot away


def test_the_reconcile_cron_reads_the_slot_and_finds_no_drift(lconn: Conn, lurl: str) -> None:
    """Writes not drained yet are lag, not drift: reconcile drains and projects them
    first, so a clean tenant exits 0, and the slot is read up to now."""
    project.switch(lconn, TENANT, "logical")
    pid = new_product(lconn, [img(A, 0)])
    write_images(lconn, pid, [img(B, 0), img(A, 1)])
    (outcome,) = reconcile.run(lurl, [TENANT])
    assert outcome.exit_code == runs.CLEAN
    assert [kind for kind, _, _ in events_of(lconn, pid)] == ["images.inserted", "images.updated"]
    assert in_sync(lconn, pid)
    slot = logical.lag(lconn)
    assert slot is not None
    assert slot.bytes < 64 * 1024


def test_a_lost_slot_stops_the_drain_and_the_way_back_still_works(
    logical_server: str, lconn: Conn, lurl: str
) -> None:
    """The server invalidates a slot that keeps more WAL than max_slot_wal_keep_size.
    Draining then refuses and says what to do; switching back to deferred still works
    (with a warning), drops the slot, and reconcile repairs what was never logged."""
    project.switch(lconn, TENANT, "logical")
    pid = new_product(lconn, [img(A, 0)])
    write_images(lconn, pid, [img(B, 0)])  # never drained: the slot will lose it
    with psycopg.connect(logical_server, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            lconn.execute("CREATE TABLE public.filler AS SELECT g FROM generate_series(1, 1) g")
            for _ in range(3):  # a few WAL segments past the limit, then a checkpoint
                lconn.execute("INSERT INTO public.filler SELECT generate_series(1, 400000)")
                lconn.execute("SELECT pg_switch_wal()")
            admin.execute("CHECKPOINT")
            assert logical.slot_lost(lconn)
        finally:
            admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            admin.execute("SELECT pg_reload_conf()")
    with pytest.raises(LogicalCaptureError, match="lost WAL"):
        project.project(lconn, TENANT)
    project.switch(lconn, TENANT, "deferred")
    assert capture.projection_of(lconn, TENANT) == "deferred"
    assert not logical.slot_exists(lconn)
    (outcome,) = reconcile.run(lurl, [TENANT])
    assert outcome.exit_code == runs.REPAIRED
    assert in_sync(lconn, pid)
    assert events_of(lconn, pid)[-1][1]["after"] == [img(B, 0)]  # logged by reconcile


def test_deploy_takes_a_logical_tenant_to_table_inline(lconn: Conn, lurl: str) -> None:
    """Stage table refuses a logical tenant (and a deferred one); the deploy sequence
    switches it to inline before that step, drops the unused slot, and the tenant arrives
    exact."""
    project.switch(lconn, TENANT, "logical")
    pid = new_product(lconn, [img(A, 0)])
    options = deploy.DeployOptions(shadow_wait_s=0.1, contract_min_table_age_s=0)
    with pytest.raises(DeployStoppedError, match="shadow"):
        deploy.run(lurl, [TENANT], options)
    lconn.execute("UPDATE imgmig.shadow_stats SET reads = reads + 10")  # the shadow traffic
    with pytest.raises(DeployStoppedError, match="confirm-contract"):  # table reached
        deploy.run(lurl, [TENANT], options)
    assert scalar(lconn, sql.SQL("SELECT stage FROM imgmig.tenant_state")) == "table"
    assert capture.projection_of(lconn, TENANT) == "inline"
    assert not logical.slot_exists(lconn)
    assert [kind for kind, _, _ in events_of(lconn, pid)][:1] == ["images.inserted"]
    assert in_sync(lconn, pid)


def test_back_at_jsonb_a_logical_tenant_comes_forward_deferred(lconn: Conn) -> None:
    """Going back to jsonb leaves the log incomplete: the tenant returns deferred, whose
    events keep 'before', until a new backfill allows logical again."""
    project.switch(lconn, TENANT, "logical")
    with lconn.transaction():
        go(lconn, "jsonb")
    assert capture.projection_of(lconn, TENANT) == "deferred"
    assert logical.published(lconn) == set()
    with lconn.transaction():
        go(lconn, "dual_write")
    assert capture.installed_triggers(lconn, TENANT) == {s.name for s in capture.LOG_ONLY}
    with pytest.raises(LogicalCaptureError, match="not complete"):
        project.switch(lconn, TENANT, "logical")


def test_a_long_transaction_delays_the_slot_with_a_named_error(lurl: str, lconn: Conn) -> None:
    """A new slot waits for the transactions running when it is made; one that does not
    end in time is named, and nothing is left half made."""
    with psycopg.connect(lurl) as other:
        other.execute("SELECT pg_current_xact_id()")  # an open transaction with an id
        pid = other.info.backend_pid
        with pytest.raises(LogicalCaptureError, match=f"pid {pid}, open for"):
            logical.prepare(lconn, wait_s=1)
        assert not logical.slot_exists(lconn)
    assert logical.prepare(lconn, wait_s=5)
    assert logical.slot_exists(lconn)


def test_refusals_say_why(conn: Conn, lconn: Conn) -> None:
    # the shared test server (embedded, or the PostgreSQL 15 service) runs at 'replica';
    # its tenant has no backfill either, which is the reason a logical server would give
    why = logical.unavailable(conn) or "not complete"
    with pytest.raises(LogicalCaptureError, match=re.escape(why)), conn.transaction():
        project.set_mode(conn, TENANT, "logical")
    # a tenant whose log lacks a finished backfill
    lconn.execute(
        "UPDATE imgmig.backfill_state SET status = 'running' WHERE tenant = %s", (TENANT,)
    )
    logical.prepare(lconn)
    with pytest.raises(LogicalCaptureError, match="not complete"), lconn.transaction():
        project.set_mode(lconn, TENANT, "logical")
    lconn.execute("UPDATE imgmig.backfill_state SET status = 'done' WHERE tenant = %s", (TENANT,))
    project.switch(lconn, TENANT, "logical")
    # stage table needs the reverse sync's writes told apart from the legacy app's
    with pytest.raises(LogicalCaptureError, match="reverse sync"), lconn.transaction():
        go(lconn, "table")
    assert capture.projection_of(lconn, TENANT) == "logical"
    assert logical.published(lconn) == {TENANT}


def test_a_role_without_replication_is_told_so(lurl: str, lconn: Conn) -> None:
    """At wal_level=logical a plain role still cannot read a slot: the reason names the
    attribute it lacks."""
    lconn.execute("DROP ROLE IF EXISTS imgmig_plain")
    lconn.execute("CREATE ROLE imgmig_plain LOGIN")
    try:
        with psycopg.connect(lurl, user="imgmig_plain", autocommit=True) as plain:
            why = logical.unavailable(plain)
        assert why is not None
        assert "REPLICATION" in why
        assert logical.unavailable(lconn) is None  # the superuser may
    finally:
        lconn.execute("DROP ROLE imgmig_plain")


def test_truncated_messages_are_a_protocol_error() -> None:
    for data in (b"B\x00\x00", b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x09ab", b"R\x00\x00"):
        with pytest.raises(pgoutput.ProtocolError):
            pgoutput.parse(data)
    assert pgoutput.lsn_int(pgoutput.lsn_text(0x1_0000_00AB)) == 0x1_0000_00AB
    assert pgoutput.lsn_text(0x16B3748) == "0/16B3748"


def test_reconcile_drops_a_slot_left_without_a_tenant(lconn: Conn, lurl: str) -> None:
    """`project --mode inline` killed between its switch and the slot's drop leaves a slot
    that no tenant uses and that keeps WAL forever: the next reconcile drops it."""
    project.switch(lconn, TENANT, "logical")
    assert logical.slot_exists(lconn)
    with lconn.transaction():  # the switch back, without the drop that follows it
        project.set_mode(lconn, TENANT, "inline")
    assert logical.slot_exists(lconn)
    assert logical.published(lconn) == set()
    [outcome] = reconcile.run(lurl, [TENANT], mode="reconcile")
    assert outcome.exit_code == 0
    assert not logical.slot_exists(lconn)
