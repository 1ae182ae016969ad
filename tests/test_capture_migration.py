"""Revision 0002: per tenant, the shared capture functions and the tenant's event log."""

from __future__ import annotations

import pytest

from cdc import migrate
from cdc.errors import StageRefusedError
from tests.capture_support import TENANT, Conn, go, img, in_sync, new_product


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
