"""One session advisory lock per tenant, shared by backfill and reconcile.

Backfill and reconcile both write a tenant's ``product_images``; two of them on one
tenant would do the same work twice and make a cron run's counts meaningless. Each run
takes ``pg_try_advisory_lock(hashtext('imgmig.tenant-run'), hashtext(tenant))`` on a
connection it keeps for the whole run, and a run that finds the lock taken exits at once
(``TenantBusyError``). The lock dies with the connection, so a SIGKILLed run never leaves
a tenant locked. Verify is read-only and takes no lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from cdc.db import Conn
from cdc.errors import TenantBusyError

NAMESPACE: Final = "imgmig.tenant-run"

_TRY = "SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))"
# Advisory locks on two int4 keys show classid/objid as the keys and objsubid = 2.
_HOLDER = """
    SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, '')
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
       AND l.classid::int = hashtext(%s) AND l.objid::int = hashtext(%s)
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def try_lock(conn: Conn, tenant: str) -> bool:
    """Take the tenant's run lock on ``conn`` if nobody holds it."""
    row = conn.execute(_TRY, (NAMESPACE, tenant)).fetchone()
    return bool(row and row[0])


def unlock(conn: Conn, tenant: str) -> None:
    conn.execute(_UNLOCK, (NAMESPACE, tenant))


def holder(conn: Conn, tenant: str) -> str:
    """Who holds the tenant's run lock, for the error message."""
    row = conn.execute(_HOLDER, (NAMESPACE, tenant)).fetchone()
    if row is None:
        return "another session"
    return f"pid {row[0]}, application {row[1] or '?'}"


def lock_all(conn: Conn, tenants: Sequence[str], action: str) -> None:
    """Lock every tenant or none: a busy tenant releases what was taken and raises."""
    taken: list[str] = []
    for tenant in tenants:
        if not try_lock(conn, tenant):
            who = holder(conn, tenant)
            for done in taken:
                unlock(conn, done)
            raise TenantBusyError(tenant=tenant, action=action, holder=who)
        taken.append(tenant)


def lock_free(conn: Conn, tenants: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Lock every tenant nobody holds; returns those taken, and (tenant, holder) for the
    others. For runs over every tenant: one busy tenant (a long backfill, say) does not
    hold up the rest."""
    taken: list[str] = []
    busy: list[tuple[str, str]] = []
    for tenant in tenants:
        if try_lock(conn, tenant):
            taken.append(tenant)
        else:
            busy.append((tenant, holder(conn, tenant)))
    return taken, busy
