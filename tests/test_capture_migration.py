"""Revision 0002: per tenant, the shared capture functions and the tenant's event log."""

from __future__ import annotations

import pytest

from cdc import migrate
from cdc.errors import StageRefusedError
from tests.capture_support import TENANT, Conn, go


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
