"""Contract: archive ``products.images``, then drop it; and the way back.

The Alembic revision ``contract`` calls :func:`contract_tenant` and
:func:`restore_tenant`, one tenant at a time, inside env.py's per-tenant transaction.

Contract, per tenant:
1. refuse unless the tenant is ready (:func:`readiness`): stage ``table`` for at least
   ``min_table_age``, the last verify clean, no service instance still reading JSONB;
2. archive every product's JSONB into ``imgmig.images_archive`` (restorable with
   ``imgmig archive restore``);
3. move the stage to ``contracted`` (which removes the capture and reverse triggers);
4. drop the column under ``lock_timeout`` with a bounded retry.

Restore (the downgrade), per tenant:
1. add the column back as ``jsonb NOT NULL DEFAULT '[]'`` (catalog-only since PG 11);
2. move the stage back to ``table`` (reinstalls reverse sync, so concurrent writes to
   ``product_images`` keep the JSONB current while we fill it), in one transaction with
   its triggers; a rerun after an interruption installs whatever triggers are missing;
3. rebuild every product's JSONB from ``product_images`` through the canonical mapping,
   in keyset batches that lock only their own products.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import structlog
from psycopg import sql

from cdc import capture, cutover
from cdc import stage as stage_mod
from cdc.db import Conn
from cdc.ddl import DEFAULT_POLICY, LockPolicy, run_ddl
from cdc.errors import ContractRefusedError
from cdc.tenants import CONTROL_SCHEMA

log = structlog.get_logger(__name__)

ARCHIVE = sql.Identifier(CONTROL_SCHEMA, "images_archive")
HEARTBEAT_FRESH = timedelta(seconds=60)
JSONB_READING_STAGES = ("jsonb", "dual_write", "shadow_read")

_ARCHIVE_DDL = sql.SQL(
    """CREATE TABLE IF NOT EXISTS {archive} (
        tenant text NOT NULL,
        product_id bigint NOT NULL,
        images jsonb NOT NULL,
        archived_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant, product_id)
    )"""
)


@dataclass(frozen=True, kw_only=True)
class ContractOptions:
    min_table_age: timedelta = timedelta(hours=1)
    batch_size: int = 500
    policy: LockPolicy = DEFAULT_POLICY


def readiness(conn: Conn, tenant: str, min_table_age: timedelta) -> list[str]:
    """Why ``tenant`` may not be contracted yet; empty when it may."""
    state = stage_mod.get(conn, tenant)
    reasons = []
    if state.stage is not stage_mod.Stage.TABLE:
        reasons.append(f"stage is {state.stage.value!r}, not 'table'")
    age = conn.execute("SELECT now() - %s", (state.stage_changed_at,)).fetchone()
    if age is not None and age[0] < min_table_age:
        reasons.append(f"in stage table for {age[0]}, less than {min_table_age}")
    problem = cutover.verify_problem(conn, tenant)
    if problem:
        reasons.append(f"{problem} (run `imgmig verify` or `imgmig reconcile`)")
    reasons.extend(
        f"instance {instance} still reads JSONB (stage {stage})"
        for instance, stage in jsonb_readers(conn, tenant)
    )
    return reasons


def jsonb_readers(conn: Conn, tenant: str) -> list[tuple[str, str]]:
    """(instance, stage) of service instances that recently served ``tenant`` from JSONB."""
    rows = conn.execute(
        sql.SQL(
            "SELECT instance, stage FROM {} WHERE tenant = %s AND stage = ANY(%s) "
            "AND seen_at > now() - %s ORDER BY instance"
        ).format(sql.Identifier(CONTROL_SCHEMA, "reader_heartbeats")),
        (tenant, list(JSONB_READING_STAGES), HEARTBEAT_FRESH),
    ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def archive(conn: Conn, tenant: str) -> int:
    """Copy every product's JSONB into the archive (replacing an older copy)."""
    conn.execute(_ARCHIVE_DDL.format(archive=ARCHIVE))
    cur = conn.execute(
        sql.SQL(
            "INSERT INTO {archive} (tenant, product_id, images) "
            "SELECT %s, id, images FROM {products} "
            "ON CONFLICT (tenant, product_id) DO UPDATE "
            "SET images = EXCLUDED.images, archived_at = now()"
        ).format(archive=ARCHIVE, products=sql.Identifier(tenant, "products")),
        (tenant,),
    )
    return cur.rowcount


def contract_tenant(conn: Conn, tenant: str, options: ContractOptions) -> int:
    """Archive, then drop ``products.images``; returns the number of products archived."""
    if not cutover.jsonb_column_exists(conn, tenant):
        log.info("already contracted", tenant=tenant)
        return 0
    reasons = readiness(conn, tenant, options.min_table_age)
    if reasons:
        raise ContractRefusedError(tenant=tenant, reasons=tuple(reasons))
    archived = archive(conn, tenant)
    stage_mod.set_stage(conn, tenant, stage_mod.Stage.CONTRACTED, reason="contract migration")
    drop = sql.SQL("ALTER TABLE {} DROP COLUMN images").format(sql.Identifier(tenant, "products"))
    run_ddl(conn, drop, policy=options.policy, schema=tenant)
    log.info("contracted", tenant=tenant, archived=archived)
    return archived


def restore_tenant(conn: Conn, tenant: str, options: ContractOptions) -> int:
    """Bring ``products.images`` back, rebuilt from ``product_images``; returns products."""
    if not cutover.jsonb_column_exists(conn, tenant):
        add = sql.SQL("ALTER TABLE {} ADD COLUMN images jsonb NOT NULL DEFAULT '[]'").format(
            sql.Identifier(tenant, "products")
        )
        run_ddl(conn, add, policy=options.policy, schema=tenant)
    with conn.transaction():  # the stage and its triggers together, or neither
        current = stage_mod.get(conn, tenant).stage
        if current is stage_mod.Stage.CONTRACTED:
            stage_mod.set_stage(conn, tenant, stage_mod.Stage.TABLE, reason="contract downgrade")
        else:  # an interrupted restore: its stage changed, its triggers may not have
            capture.apply_stage(conn, tenant, current.value)
    archived = _archive_count(conn, tenant)
    if archived is None:
        log.warning("archive missing: restoring from product_images alone", tenant=tenant)
    restored = rebuild_jsonb(
        conn, tenant, batch_size=options.batch_size, use_archive=archived is not None
    )
    log.info("restored images column", tenant=tenant, products=restored, archived=archived)
    return restored


def rebuild_jsonb(conn: Conn, tenant: str, *, batch_size: int, use_archive: bool) -> int:
    """Rewrite ``products.images`` from the rows, in keyset batches over ``products.id``.

    The rows are the source of truth. Where the archived JSONB has the same canonical
    hash as the rows (the product did not change since the contract), the archived bytes
    are restored as they were, legacy quirks (missing or duplicate ``order``) included;
    otherwise the canonical JSONB built from the rows is written.

    Each batch, in one transaction:
    1. lock the batch's products (``FOR NO KEY UPDATE``): writers of those products wait,
       and writes committed before the lock are visible to the next statement;
    2. rebuild in a *second* statement, so its snapshot is taken after the lock (a STABLE
       function in the locking statement would read rows as of before the wait);
    3. mark the write as derived from the rows (``imgmig.syncing = 'reverse'``), so the
       capture trigger does not project it back into the table.
    """
    lock = _LOCK_BATCH.format(products=sql.Identifier(tenant, "products"))
    rebuild = (_REBUILD_WITH_ARCHIVE if use_archive else _REBUILD).format(
        products=sql.Identifier(tenant, "products"), archive=ARCHIVE
    )
    after, total = 0, 0
    while True:
        with conn.transaction():
            conn.execute("SELECT set_config('imgmig.syncing', 'reverse', true)")
            conn.execute("SELECT set_config('imgmig.source', 'reconcile', true)")
            ids = [int(r[0]) for r in conn.execute(lock, {"after": after, "n": batch_size})]
            if not ids:
                return total
            conn.execute(rebuild, {"ids": ids, "tenant": tenant})
        after, total = ids[-1], total + len(ids)


_LOCK_BATCH = sql.SQL(
    "SELECT id FROM {products} WHERE id > %(after)s ORDER BY id LIMIT %(n)s FOR NO KEY UPDATE"
)
_REBUILD = sql.SQL(
    """UPDATE {products} p SET images = r.images
         FROM imgmig.rows_images(%(tenant)s, %(ids)s) r
        WHERE p.id = r.product_id AND p.images IS DISTINCT FROM r.images"""
)
_REBUILD_WITH_ARCHIVE = sql.SQL(
    """UPDATE {products} p
          SET images = CASE WHEN imgmig.images_hash(a.images) = imgmig.images_hash(r.images)
                            THEN a.images ELSE r.images END
         FROM imgmig.rows_images(%(tenant)s, %(ids)s) r
         LEFT JOIN {archive} a ON a.tenant = %(tenant)s AND a.product_id = r.product_id
        WHERE p.id = r.product_id"""
)


def _archive_count(conn: Conn, tenant: str) -> int | None:
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.images_archive",)
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE tenant = %s").format(ARCHIVE), (tenant,)
    ).fetchone()
    return int(row[0]) if row else 0


def restore_archive(conn: Conn, tenant: str, *, include_changed: bool = False) -> tuple[int, int]:
    """``imgmig archive restore``: put archived JSONB back where the column exists.

    Returns (products written, products whose images changed since the archive). By
    default only the archived *bytes* go back: a product is written only where its
    archived images equal its rows' in canonical form (legacy quirks such as a missing
    ``order`` come back; no image is added, removed or moved). A product changed since
    the contract is counted and left alone, unless ``include_changed``: then its archived
    images replace the change (capture logs the write, so the event log keeps both).
    Products created after the archive are left alone. Refuses if the column is gone, or
    back but not yet rebuilt (run the downgrade, or run it again, first).
    """
    if not cutover.jsonb_column_exists(conn, tenant):
        raise ContractRefusedError(
            tenant=tenant,
            reasons=("products.images does not exist; downgrade first",),
            action="restore the archive of",
        )
    if cutover.restore_unfinished(conn, tenant):
        raise ContractRefusedError(
            tenant=tenant, reasons=(cutover.RESTORE_UNFINISHED,), action="restore the archive of"
        )
    row = conn.execute(
        _RESTORE_ARCHIVE.format(products=sql.Identifier(tenant, "products"), archive=ARCHIVE),
        {"tenant": tenant, "all": include_changed},
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


_RESTORE_ARCHIVE = sql.SQL(
    """WITH a AS (SELECT product_id, images FROM {archive} WHERE tenant = %(tenant)s),
            r AS (SELECT * FROM imgmig.rows_images(
                    %(tenant)s, (SELECT array_agg(product_id) FROM a))),
            differ AS (
              SELECT a.product_id, a.images,
                     imgmig.images_hash(a.images) = imgmig.images_hash(r.images) AS same
                FROM a JOIN r USING (product_id) JOIN {products} p ON p.id = a.product_id
               WHERE p.images IS DISTINCT FROM a.images),
            written AS (
              UPDATE {products} p SET images = d.images FROM differ d
               WHERE p.id = d.product_id AND (d.same OR %(all)s) RETURNING 1)
       SELECT (SELECT count(*) FROM written), (SELECT count(*) FROM differ WHERE NOT same)"""
)
