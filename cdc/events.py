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

    Runs in the caller's transaction (or one of its own): the table is emptied and
    refilled from the latest change event of each product, through the canonical
    mapping. Row ids are new; everything the events carried (table-only values reach the
    log through the reverse sync) comes back.

    Label decisions are kept. The label strategies, the legacy evidence and the review
    queue set ``is_label``, ``label_strategy`` and ``label_confidence`` on the rows
    directly, and before stage ``table`` nothing logs that. So they are set aside first,
    then put back on the rebuilt rows of the same product and url (the n-th copy of a
    url on the n-th), unless the events decided that row (an explicit flag) or another
    row of the product is the label now.
    """
    images = sql.Identifier(tenant, "product_images")
    with conn.transaction():  # the set-aside decisions live as long as the rebuild
        conn.execute("DROP TABLE IF EXISTS pg_temp.imgmig_replay_labels")
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE imgmig_replay_labels ON COMMIT DROP AS "
                "SELECT product_id, url, is_label, label_strategy, label_confidence, "
                '       row_number() OVER (PARTITION BY product_id, url ORDER BY "order") AS nth '
                "  FROM {} WHERE label_strategy IS DISTINCT FROM 'explicit' "
                "   AND label_strategy IS NOT NULL"
            ).format(images)
        )
        row = conn.execute("SELECT imgmig.replay(%s)", (tenant,)).fetchone()
        count = int(row[0]) if row is not None else 0
        # Quiet, as the replay itself: the reverse sync leaves the JSONB and the log alone.
        was = conn.execute("SELECT current_setting('imgmig.syncing', true)").fetchone()
        conn.execute("SELECT set_config('imgmig.syncing', 'capture', true)")
        kept = conn.execute(_PUT_BACK.format(images=images)).rowcount
        conn.execute(
            "SELECT set_config('imgmig.syncing', %s, true)", ((was[0] if was else "") or "",)
        )
    log.info("replayed event log", tenant=tenant, products=count, label_decisions_kept=kept)
    return count


_PUT_BACK = sql.SQL(
    """UPDATE {images} r
          SET is_label = k.is_label, label_strategy = k.label_strategy,
              label_confidence = k.label_confidence
         FROM (SELECT i.id, i.product_id, i.url,
                      row_number() OVER (PARTITION BY i.product_id, i.url ORDER BY i."order") AS nth
                 FROM {images} i) n
         JOIN pg_temp.imgmig_replay_labels k
           ON k.product_id = n.product_id AND k.url = n.url AND k.nth = n.nth
        WHERE r.id = n.id AND r.label_strategy IS NULL
          AND NOT (k.is_label AND EXISTS (
                SELECT 1 FROM {images} x WHERE x.product_id = r.product_id AND x.is_label))"""
)
