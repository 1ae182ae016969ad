"""Shared set-up for the cutover, service, converter and API tests.

Brings a tenant to a stage the way the lifecycle would: capture on, history snapshotted
into the table through capture's own ``imgmig.snapshot`` (standing in for the backfill of
issue 4), guard evidence recorded, then the flag moved with ``force`` where a test is not
about the guards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cdc import cutover
from cdc.stage import Stage
from services.db import make_engine, tenant_session
from services.image_service import ProductImageService
from services.image_types import ServiceSettings

PG = psycopg.Connection[tuple[Any, ...]]
SYNCED = (Stage.DUAL_WRITE, Stage.SHADOW_READ, Stage.TABLE)


def tq(template: LiteralString, tenant: str) -> sql.Composed:
    """A query on the tenant's tables, composed (never pasted)."""
    return sql.SQL(template).format(
        products=sql.Identifier(tenant, "products"),
        images=sql.Identifier(tenant, "product_images"),
    )


def connect(url: str) -> PG:
    return psycopg.connect(url, autocommit=True)


def backfill(conn: PG, tenant: str) -> None:
    """Snapshot every product into the table and mark the backfill done."""
    ids = [r[0] for r in conn.execute(tq("SELECT id FROM {products}", tenant)).fetchall()]
    conn.execute("SELECT imgmig.snapshot(%s, %s, 'backfill')", (tenant, ids))
    conn.execute(
        "INSERT INTO imgmig.backfill_state (tenant, status, started_at, finished_at) "
        "VALUES (%s, 'done', now(), now()) ON CONFLICT (tenant) DO UPDATE "
        "SET status = 'done', started_at = now(), finished_at = now()",
        (tenant,),
    )


def record_verify(conn: PG, tenant: str, *, drift: int = 0, finished: bool = True) -> None:
    """A verify run row as issue 4's verify writes it."""
    conn.execute(
        "INSERT INTO imgmig.verify_runs (tenant, mode, stage, finished_at, drift_total) "
        "VALUES (%s, 'verify', 'dual_write', CASE WHEN %s THEN now() END, %s)",
        (tenant, finished, drift),
    )


def move(conn: PG, tenant: str, stage: Stage, *, reason: str = "test set-up") -> None:
    """Move a tenant, forced: for tests that are not about the guards."""
    with conn.transaction():
        cutover.change_stage(conn, tenant, stage, reason=reason, actor="tests", force=True)


def bring_to(conn: PG, tenant: str, stage: Stage) -> None:
    """jsonb -> ``stage`` along the lifecycle, with the table backfilled on the way."""
    for step in Stage:
        if step.rank > stage.rank:
            break
        if step is not Stage.JSONB:
            move(conn, tenant, step)
        if step is Stage.DUAL_WRITE:
            backfill(conn, tenant)


def mark_true_labels(conn: PG, tenant: str) -> int:
    """Set ``is_label`` in the table from the seed's truth (tests only read the truth)."""
    cur = conn.execute(
        tq(
            "UPDATE {images} i SET is_label = true FROM seed_truth.labels t "
            "WHERE t.tenant = %s AND t.product_id = i.product_id AND i.id = ("
            "  SELECT j.id FROM {images} j WHERE j.product_id = t.product_id "
            '  AND j.url = t.url ORDER BY j."order" DESC LIMIT 1)',  # the last one: the label
            tenant,
        ),
        (tenant,),
    )
    return cur.rowcount


def out_of_sync(conn: PG, tenant: str) -> list[int]:
    """Products whose JSONB and rows differ through the canonical mapping (empty: in sync)."""
    rows = conn.execute(
        tq(
            "SELECT p.id FROM {products} p WHERE imgmig.images_hash(p.images) "
            "IS DISTINCT FROM imgmig.rows_hash(%s, p.id) ORDER BY p.id",
            tenant,
        ),
        (tenant,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def snapshot(conn: PG, tenant: str, product_id: int) -> tuple[Any, ...]:
    """Both sides of one product, for no-partial-write assertions."""
    images = conn.execute(
        tq("SELECT images FROM {products} WHERE id = %s", tenant), (product_id,)
    ).fetchone()
    rows = conn.execute(
        tq(
            'SELECT id, url, "order", is_label, alt_text, mime_type FROM {images} '
            "WHERE product_id = %s ORDER BY id",
            tenant,
        ),
        (product_id,),
    ).fetchall()
    return (images, rows)


@contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def service(
    engine: Engine, tenant: str, settings: ServiceSettings | None = None
) -> Iterator[ProductImageService]:
    """A service in its own transaction, committed on success (the caller's job)."""
    session: Session = tenant_session(engine, tenant)
    try:
        yield ProductImageService(session, tenant, settings=settings or ServiceSettings())
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
