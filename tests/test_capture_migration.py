"""Revisions 0002-0004: per tenant, the shared capture functions and the event log."""

from __future__ import annotations

import pytest

from cdc import migrate, project
from cdc.errors import StageRefusedError
from tests.capture_support import (
    TENANT,
    Conn,
    events_of,
    go,
    img,
    in_sync,
    new_product,
    write_images,
)


def has_event_log(conn: Conn, tenant: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{tenant}.image_events",)).fetchone()
    return bool(row and row[0])


def has_mapping(conn: Conn) -> bool:
    row = conn.execute("SELECT to_regprocedure('imgmig.images_hash(jsonb)') IS NOT NULL").fetchone()
    return bool(row and row[0])


def tenants(conn: Conn) -> list[str]:
    rows = conn.execute("SELECT tenant FROM imgmig.tenant_state ORDER BY tenant").fetchall()
    return [str(r[0]) for r in rows]


def test_upgrade_gives_every_tenant_an_event_log(conn: Conn) -> None:
    """After upgrade head, every tenant (template included) has image_events."""
    assert "template_tenant" in tenants(conn)
    assert all(has_event_log(conn, t) for t in tenants(conn))
    assert has_mapping(conn)


def test_downgrade_removes_only_that_tenants_log_then_the_functions(
    conn: Conn, migrated_url: str
) -> None:
    """Downgrading one tenant drops its log; the shared functions go with the last one."""
    migrate.downgrade(migrated_url, "0001_expand", tenants=[TENANT])
    assert not has_event_log(conn, TENANT)
    assert has_event_log(conn, "user_2")
    assert has_mapping(conn)
    migrate.downgrade(migrated_url, "0001_expand")
    assert not has_mapping(conn)
    migrate.upgrade(migrated_url)
    assert all(has_event_log(conn, t) for t in tenants(conn))


def test_downgrade_refused_while_triggers_need_capture(conn: Conn, migrated_url: str) -> None:
    """A tenant past stage jsonb keeps its capture machinery: downgrade is refused."""
    go(conn, "dual_write")
    with pytest.raises(StageRefusedError):
        migrate.downgrade(migrated_url, "0001_expand", tenants=[TENANT])
    assert has_event_log(conn, TENANT)


def txid_index(conn: Conn, tenant: str) -> str | None:
    """The access method of the tenant's index on image_events (txid), if any."""
    row = conn.execute(
        "SELECT am.amname FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = x.relam JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indrelid = to_regclass(%s) AND a.attname = 'txid'",
        (f"{tenant}.image_events",),
    ).fetchone()
    return str(row[0]) if row else None


def has_function(conn: Conn, signature: str) -> bool:
    row = conn.execute("SELECT to_regprocedure(%s) IS NOT NULL", (signature,)).fetchone()
    return bool(row and row[0])


def test_capture_v2_swaps_the_txid_index_and_the_last_downgrade_restores_v1(
    conn: Conn, migrated_url: str
) -> None:
    """0003: BRIN on image_events (txid) per tenant; the shared v2 functions go back to
    v1's only when the last tenant leaves the revision."""
    assert {txid_index(conn, t) for t in tenants(conn)} == {"brin"}
    assert has_function(conn, "imgmig.record_malformed(text, bigint)")
    migrate.downgrade(migrated_url, "0002_capture", tenants=[TENANT])
    assert txid_index(conn, TENANT) == "btree"
    assert txid_index(conn, "user_2") == "brin"
    assert has_function(conn, "imgmig.record_malformed(text, bigint)")
    migrate.downgrade(migrated_url, "0002_capture")
    assert {txid_index(conn, t) for t in tenants(conn)} == {"btree"}
    assert not has_function(conn, "imgmig.record_malformed(text, bigint)")
    assert not has_function(conn, "imgmig.images_clean(jsonb)")
    go(conn, "dual_write")  # v1's functions capture on their own again
    pid = new_product(conn, [img("https://x/a.jpg", 0), img("https://x/b.jpg", 1)])
    assert in_sync(conn, pid)
    go(conn, "jsonb")
    migrate.upgrade(migrated_url)
    assert {txid_index(conn, t) for t in tenants(conn)} == {"brin"}
    assert has_function(conn, "imgmig.images_clean(jsonb)")


def log_function_of(conn: Conn, tenant: str) -> str | None:
    """The function the tenant's deferred UPDATE trigger calls, schema-qualified."""
    row = conn.execute(
        "SELECT n.nspname || '.' || p.proname FROM pg_trigger t "
        "JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE t.tgrelid = to_regclass(%s) AND t.tgname = 'imgmig_log_upd'",
        (f"{tenant}.products",),
    ).fetchone()
    return str(row[0]) if row else None


def test_capture_v3_repoints_deferred_triggers_and_downgrade_puts_v2_back(
    conn: Conn, migrated_url: str
) -> None:
    """0004: a deferred tenant's log triggers move to its own function, and back."""
    with conn.transaction():
        project.set_mode(conn, TENANT, "deferred")
    go(conn, "dual_write")
    assert log_function_of(conn, TENANT) == f"{TENANT}.imgmig_log_products_row"
    migrate.downgrade(migrated_url, "0003_capture_v2", tenants=[TENANT])
    assert log_function_of(conn, TENANT) == "imgmig.log_products_row"
    assert not has_function(conn, f"{TENANT}.imgmig_log_products_row()")
    assert has_function(conn, "imgmig.install_log_function(text, boolean)")  # other tenants use it
    pid = new_product(conn, [img("https://x/a.jpg", 0)])  # v2's shared function logs
    assert [kind for kind, _, _ in events_of(conn, pid)] == ["images.inserted"]
    migrate.upgrade(migrated_url)
    assert log_function_of(conn, TENANT) == f"{TENANT}.imgmig_log_products_row"
    write_images(conn, pid, [img("https://x/b.jpg", 0)])
    payload = events_of(conn, pid)[-1][1]  # no backfill yet: 'before' is kept
    assert payload["after"] == [img("https://x/b.jpg", 0)]
    assert payload["before"] == [img("https://x/a.jpg", 0)]
    go(conn, "jsonb")
    migrate.downgrade(migrated_url, "0003_capture_v2")
    assert not has_function(conn, "imgmig.install_log_function(text, boolean)")
    migrate.upgrade(migrated_url)
    assert has_function(conn, "imgmig.install_log_function(text, boolean)")
