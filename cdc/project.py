"""The deferred projector: applies a tenant's pending events to ``product_images``.

In deferred mode (``imgmig.tenant_state.projection = 'deferred'``) the capture trigger
only appends events; ``project`` applies them, in order per product and idempotently,
with its checkpoint in ``imgmig.projector_checkpoint`` (see ``imgmig.project_pending`` in
``cdc/sql/capture_v1.sql`` for why the checkpoint is a transaction-id horizon). In
logical mode the events come from the WAL: ``project`` first drains the capture slot
(``cdc.logical.drain``) into the event logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import structlog

from cdc import capture, logical
from cdc.db import Conn

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Lag:
    """Events not applied yet, and when the oldest was written; for a logical tenant also
    the WAL its slot has not read yet (``wal_bytes``; None for the other modes)."""

    tenant: str
    pending: int
    oldest: datetime | None
    wal_bytes: int | None = None


def project(conn: Conn, tenant: str, *, drain: bool = True) -> int:
    """One projector run for ``tenant`` in its own transaction; returns products applied.

    The capture slot is drained first, if the database has one (every logical tenant's
    writes, not only this one's: they share the slot). A caller projecting many tenants
    in a row drains once and passes ``drain=False``.
    """
    if drain:
        logical.drain(conn)
    with conn.transaction():
        row = conn.execute("SELECT imgmig.project_pending(%s)", (tenant,)).fetchone()
    count = int(row[0]) if row is not None else 0
    log.info("projected pending events", tenant=tenant, products=count)
    return count


def lag(conn: Conn, tenant: str) -> Lag:
    """How far the projector is behind the event log of ``tenant``."""
    row = conn.execute(
        "SELECT pending, oldest FROM imgmig.projection_lag(%s)", (tenant,)
    ).fetchone()
    wal = None
    if capture.projection_of(conn, tenant) == "logical":
        slot = logical.lag(conn)
        wal = slot.bytes if slot is not None else None
    if row is None:
        return Lag(tenant=tenant, pending=0, oldest=None, wal_bytes=wal)
    return Lag(tenant=tenant, pending=int(row[0]), oldest=row[1], wal_bytes=wal)


def switch(conn: Conn, tenant: str, mode: str) -> None:
    """Switch ``tenant``'s projection with what goes around it; outside a transaction.

    To logical: the publication and the slot first (``cdc.logical.prepare``). Away from
    it: the slot drained first, so that the drain the switch repeats under ``products``'
    trigger lock is short; then the slot dropped if no tenant uses it any more. To inline:
    the pending events projected before the switch, then the rest in its transaction
    (``set_mode``).
    """
    if mode == "logical":
        logical.prepare(conn)
    elif not logical.slot_lost(conn):
        logical.drain(conn)
    if mode == "inline":
        project(conn, tenant, drain=False)  # the backlog, before the trigger lock
    with conn.transaction():
        set_mode(conn, tenant, mode)
    if mode != "logical":
        logical.drop_slot_if_unused(conn)


def set_mode(conn: Conn, tenant: str, mode: str) -> None:
    """Switch ``tenant`` between 'inline', 'deferred' and 'logical' (caller's transaction).

    The capture triggers change shape with the mode (``cdc.capture.set_projection``).
    To inline, the events still pending are projected in the same transaction, under the
    trigger lock: nothing projects an inline tenant's log later, and from stage table on
    the reconciler would take the table without them for the truth and write it over the
    JSONB, losing the legacy writes they carry.
    """
    capture.set_projection(conn, tenant, mode)
    if mode == "inline":
        conn.execute("SELECT imgmig.project_pending(%s)", (tenant,))
