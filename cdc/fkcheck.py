"""The backfill batch's own proof of ``product_images.product_id``, and when it may skip
PostgreSQL's check of it.

Every row a backfill batch writes into ``<tenant>.product_images`` names a product that
the same statement has just locked ``FOR NO KEY UPDATE`` (``backfill._LOCK_AND_PROJECT``):
the product exists, and nobody can delete it or change its key until the batch commits.
PostgreSQL's foreign-key check (a trigger per row that looks the product up again and
locks it ``FOR KEY SHARE``) therefore cannot fail there, yet it took a quarter of each
batch (BENCHMARKS.md, "Backfill", session 12). With ``session_replication_role =
replica`` for that one statement PostgreSQL does not fire it: the switch that
``pg_restore --disable-triggers`` and logical replication use to skip the same check.

``replica`` skips *every* trigger enabled the ordinary way, so the batch sets it only when

1. the role may set the parameter (a superuser; from PostgreSQL 15,
   ``GRANT SET ON PARAMETER session_replication_role``), tried once per connection in a
   rolled-back transaction (:func:`allowed`); and
2. per batch, after locking both tables ``ROW EXCLUSIVE`` (the lock the batch takes
   anyway, and one that ``CREATE TRIGGER`` must wait for), nothing else would be skipped
   (:func:`enter`): on ``product_images`` no trigger fires at ``origin`` but the checks of
   foreign keys from ``product_id`` to the tenant's ``products``; on ``image_events`` none
   fires on ``INSERT``. Anything else (an audit trigger, the reverse sync, the ``ON
   DELETE`` action of a foreign key *to* ``product_images``) and the batch runs with every
   trigger, as it did before, and says so once. So does a trigger enabled ``REPLICA``
   only, which ``replica`` would start to fire.

The setting is transaction-local (``set_config(..., true)``: gone at commit or rollback,
whatever happens) and is put back right after the batch statement (:func:`leave`), so the
labels and the checkpoint that follow run as usual. ``imgmig backfill --fk-check always``
keeps the check.
"""

from __future__ import annotations

from typing import Final

from psycopg import errors, sql

from cdc.db import Conn

MODES: Final = ("auto", "always")

_PARAMETER: Final = "session_replication_role"

_TRY: Final = sql.SQL("SELECT current_setting({p}), set_config({p}, 'replica', true)").format(
    p=sql.Literal(_PARAMETER)
)

_LOCK: Final = sql.SQL("LOCK TABLE {images}, {events} IN ROW EXCLUSIVE MODE")

# Triggers whose firing in the batch 'replica' would change, other than the product_id
# check: enabled at 'origin' only (O: they would not fire) or at 'replica' only (R: they
# would start to). tgtype bits (PostgreSQL's trigger.h): 4 INSERT, 8 DELETE, 16 UPDATE.
_OTHERS: Final = sql.SQL(
    """SELECT t.tgrelid::regclass::text || ': ' || t.tgname
         FROM pg_catalog.pg_trigger t
        WHERE t.tgenabled IN ('O', 'R')
          AND ((t.tgrelid = {images}::regclass AND t.tgtype & 28 <> 0
                AND NOT EXISTS (
                    SELECT 1 FROM pg_catalog.pg_constraint c
                     WHERE c.oid = t.tgconstraint AND c.contype = 'f'
                       AND c.conrelid = t.tgrelid AND c.confrelid = {products}::regclass
                       AND t.tgfoid IN ('pg_catalog.\"RI_FKey_check_ins\"'::regproc,
                                        'pg_catalog.\"RI_FKey_check_upd\"'::regproc)))
            OR (t.tgrelid = {events}::regclass AND t.tgtype & 4 <> 0))
        ORDER BY 1"""
)

_SET: Final = sql.SQL("SELECT set_config({p}, %s, true)").format(p=sql.Literal(_PARAMETER))


def allowed(conn: Conn) -> str | None:
    """The connection's own ``session_replication_role`` if it may set it, else None.

    Tried in a transaction that is rolled back: a refusal aborts nothing of the caller's.
    """
    try:
        with conn.transaction(force_rollback=True):
            row = conn.execute(_TRY).fetchone()
    except errors.InsufficientPrivilege:
        return None
    return str(row[0]) if row else None


def _names(tenant: str, conn: Conn) -> dict[str, sql.Composable]:
    """The tenant's tables, as identifiers and as regclass literals (quoted names)."""
    tables = {"images": "product_images", "events": "image_events", "products": "products"}
    return {key: sql.Literal(sql.Identifier(tenant, table).as_string(conn))
            for key, table in tables.items()}  # fmt: skip


def enter(conn: Conn, tenant: str) -> list[str]:
    """Inside the batch's transaction: set ``replica`` unless another trigger would be
    skipped; return those triggers (empty: the batch skips the product_id check)."""
    conn.execute(
        _LOCK.format(
            images=sql.Identifier(tenant, "product_images"),
            events=sql.Identifier(tenant, "image_events"),
        )
    )
    others = [str(r[0]) for r in conn.execute(_OTHERS.format(**_names(tenant, conn)))]
    if not others:
        conn.execute(_SET, ("replica",))
    return others


def leave(conn: Conn, role: str) -> None:
    """Put the connection's own value back, still inside the batch's transaction."""
    conn.execute(_SET, (role,))
