"""The backfill checkpoint, one row per tenant in ``imgmig.backfill_state``.

The row is updated in the same transaction as the batch it describes, so after a
SIGKILL it names exactly the last committed batch and the run resumes after ``last_id``.
``status`` goes ``pending → running → done``; the cutover guard reads ``done``.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from psycopg import sql

from cdc.db import Conn
from cdc.tenants import CONTROL_SCHEMA

STATE: Final = sql.Identifier(CONTROL_SCHEMA, "backfill_state")
SWITCHES: Final = sql.Identifier(CONTROL_SCHEMA, "switches")
AUDIT: Final = sql.Identifier(CONTROL_SCHEMA, "stage_audit")
PAUSE_SWITCH: Final = "backfill_paused"


@dataclass(frozen=True)
class Checkpoint:
    tenant: str
    status: str
    last_id: int
    max_id: int | None
    products_done: int
    rows_done: int
    batch_size: int | None
    started_at: datetime | None


_COLUMNS: Final = sql.SQL(
    "tenant, status, last_id, max_id, products_done, rows_done, batch_size, started_at"
)


def read(conn: Conn, tenant: str) -> Checkpoint | None:
    row = conn.execute(
        sql.SQL("SELECT {} FROM {} WHERE tenant = %s").format(_COLUMNS, STATE), (tenant,)
    ).fetchone()
    return Checkpoint(*row) if row else None


def read_all(conn: Conn) -> list[Checkpoint]:
    rows = conn.execute(
        sql.SQL("SELECT {} FROM {} ORDER BY tenant").format(_COLUMNS, STATE)
    ).fetchall()
    return [Checkpoint(*row) for row in rows]


def start(conn: Conn, tenant: str, *, restart: bool = False) -> Checkpoint:
    """Mark the tenant running; keep its position unless ``restart``.

    ``max_id`` is fixed when a run starts from scratch: products inserted later were
    written with capture on, so the capture trigger has already projected them.
    """
    stmt = sql.SQL(
        """INSERT INTO {state} AS s (tenant, status, max_id, started_at)
           VALUES (%(tenant)s, 'running', (SELECT max(id) FROM {products}), now())
           ON CONFLICT (tenant) DO UPDATE SET
               status = 'running',
               last_id = CASE WHEN %(restart)s THEN 0 ELSE s.last_id END,
               max_id = CASE WHEN %(restart)s OR s.status = 'pending' THEN excluded.max_id
                             ELSE s.max_id END,
               products_done = CASE WHEN %(restart)s THEN 0 ELSE s.products_done END,
               rows_done = CASE WHEN %(restart)s THEN 0 ELSE s.rows_done END,
               started_at = CASE WHEN %(restart)s OR s.started_at IS NULL THEN now()
                                 ELSE s.started_at END,
               finished_at = NULL,
               updated_at = now()
           RETURNING {cols}"""
    ).format(state=STATE, products=sql.Identifier(tenant, "products"), cols=_COLUMNS)
    row = conn.execute(stmt, {"tenant": tenant, "restart": restart}).fetchone()
    assert row is not None
    return Checkpoint(*row)


def advance(
    conn: Conn, tenant: str, *, last_id: int, products: int, rows: int, batch_size: int
) -> None:
    """Record one committed batch (call inside the batch's transaction)."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET last_id = %s, products_done = products_done + %s, "
            "rows_done = rows_done + %s, batch_size = %s, updated_at = now() WHERE tenant = %s"
        ).format(STATE),
        (last_id, products, rows, batch_size, tenant),
    )


def finish(conn: Conn, tenant: str) -> None:
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'done', finished_at = now(), updated_at = now() "
            "WHERE tenant = %s"
        ).format(STATE),
        (tenant,),
    )


def capture_gap(conn: Conn, cp: Checkpoint) -> bool:
    """Was the tenant back at stage jsonb (capture off) since this checkpoint's run began?

    Products behind ``last_id`` may then have changed unseen, so the position is void.
    """
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE tenant = %s AND to_stage = 'jsonb' AND at >= %s)"
        ).format(AUDIT),
        (cp.tenant, cp.started_at),
    ).fetchone()
    return bool(cp.started_at is not None and row and row[0])


def log_complete(conn: Conn, tenant: str) -> bool:
    """Does the tenant's event log hold every product's images since capture has been on?

    True once a backfill has finished (an ``images.snapshot`` event per product) and the
    tenant has not been back at stage ``jsonb`` since it began.
    """
    cp = read(conn, tenant)
    return cp is not None and cp.status == "done" and not capture_gap(conn, cp)


def remaining(conn: Conn, tenant: str, cp: Checkpoint) -> int:
    """Products left to visit (for progress and ETA)."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE id > %s AND id <= %s").format(
            sql.Identifier(tenant, "products")
        ),
        (cp.last_id, cp.max_id or 0),
    ).fetchone()
    return int(row[0]) if row else 0


def paused(conn: Conn) -> bool:
    row = conn.execute(
        sql.SQL("SELECT value FROM {} WHERE name = %s").format(SWITCHES), (PAUSE_SWITCH,)
    ).fetchone()
    return bool(row and row[0])


def set_paused(conn: Conn, value: bool, *, actor: str | None = None) -> None:
    """Flip the pause switch; running backfills notice it between batches."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (name, value, changed_by) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
            "changed_at = now(), changed_by = excluded.changed_by"
        ).format(SWITCHES),
        (PAUSE_SWITCH, value, actor or getpass.getuser()),
    )
