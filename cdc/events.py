"""The event log: read a tenant's events, and rebuild ``product_images`` from them.

``T.image_events`` is append-only (a trigger rejects UPDATE, DELETE and TRUNCATE). Its
columns follow the Debezium outbox layout (``id``, ``aggregatetype``, ``aggregateid``,
``type``, ``payload``) plus ``tenant``, ``source``, ``txid``, ``at`` and ``seq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from psycopg import sql

from cdc.db import Conn

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Event:
    """One row of a tenant's event log."""

    seq: int
    aggregateid: str
    type: str
    payload: Any
    source: str
    txid: int
    at: datetime


def events(conn: Conn, tenant: str, *, product_id: int | None = None) -> list[Event]:
    """The tenant's events in log order, optionally for one product."""
    query = sql.SQL(
        "SELECT seq, aggregateid, type, payload, source, txid, at FROM {} "
        "WHERE %(pid)s::text IS NULL OR aggregateid = %(pid)s::text ORDER BY seq"
    ).format(sql.Identifier(tenant, "image_events"))
    rows = conn.execute(query, {"pid": product_id}).fetchall()
    return [Event(*row) for row in rows]


def replay(conn: Conn, tenant: str) -> int:
    """Rebuild ``tenant.product_images`` from its event log; returns products projected.

    Runs in the caller's transaction: the table is emptied and refilled from the latest
    change event of each product, through the canonical mapping. Row ids are new;
    everything the events carried (table-only values reach the log through the reverse
    sync) comes back.
    """
    row = conn.execute("SELECT imgmig.replay(%s)", (tenant,)).fetchone()
    count = int(row[0]) if row is not None else 0
    log.info("replayed event log", tenant=tenant, products=count)
    return count
