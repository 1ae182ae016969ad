"""Helpers shared by the change-capture tests (test_capture*, test_mapping, ...)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc import stage

Conn = psycopg.Connection[Any]
TENANT = "user_1"


def img(url: str, order: int, **extra: Any) -> dict[str, Any]:
    """One legacy element with the seed's created_at format."""
    return {"url": url, "order": order, "created_at": "2025-03-01T12:00:00.000000Z", **extra}


def go(conn: Conn, to: str, tenant: str = TENANT) -> None:
    """Move ``tenant`` to stage ``to`` (installs that stage's triggers)."""
    with conn.transaction():
        stage.set_stage(conn, tenant, to, reason="test", actor="pytest", force=True)


def table(tenant: str, name: str) -> sql.Identifier:
    return sql.Identifier(tenant, name)


def new_product(conn: Conn, images: Any, tenant: str = TENANT, sku: str = "T-1") -> int:
    """Insert a product through the legacy path; returns its id."""
    row = conn.execute(
        sql.SQL("INSERT INTO {} (sku, title, images) VALUES (%s, %s, %s) RETURNING id").format(
            table(tenant, "products")
        ),
        (sku, "test product", Jsonb(images)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def write_images(conn: Conn, pid: int, images: Any, tenant: str = TENANT) -> None:
    """A legacy write: raw SQL on products.images."""
    conn.execute(
        sql.SQL("UPDATE {} SET images = %s WHERE id = %s").format(table(tenant, "products")),
        (Jsonb(images), pid),
    )


def images_of(conn: Conn, pid: int, tenant: str = TENANT) -> Any:
    row = conn.execute(
        sql.SQL("SELECT images FROM {} WHERE id = %s").format(table(tenant, "products")), (pid,)
    ).fetchone()
    assert row is not None
    return row[0]


def rows_of(conn: Conn, pid: int, tenant: str = TENANT) -> list[tuple[Any, ...]]:
    """(id, url, order, is_label, alt_text, extra) of a product's rows, in order."""
    return conn.execute(
        sql.SQL(
            'SELECT id, url, "order", is_label, alt_text, extra FROM {} '
            'WHERE product_id = %s ORDER BY "order", id'
        ).format(table(tenant, "product_images")),
        (pid,),
    ).fetchall()


def urls_of(conn: Conn, pid: int, tenant: str = TENANT) -> list[str]:
    return [str(r[1]) for r in rows_of(conn, pid, tenant)]


def in_sync(conn: Conn, pid: int, tenant: str = TENANT) -> bool:
    """Both sides have the same canonical form (the verify hash)."""
    row = conn.execute(
        sql.SQL(
            "SELECT imgmig.images_hash(p.images) = imgmig.rows_hash(%s, p.id) FROM {} p "
            "WHERE p.id = %s"
        ).format(table(tenant, "products")),
        (tenant, pid),
    ).fetchone()
    assert row is not None
    return bool(row[0])


def events_of(conn: Conn, pid: int, tenant: str = TENANT) -> list[tuple[str, Any, str]]:
    """(type, payload, source) of a product's events, in log order."""
    rows = conn.execute(
        sql.SQL(
            "SELECT type, payload, source FROM {} WHERE aggregateid = %s::text ORDER BY seq"
        ).format(table(tenant, "image_events")),
        (pid,),
    ).fetchall()
    return [(str(r[0]), r[1], str(r[2])) for r in rows]


def count(conn: Conn, tenant: str, name: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table(tenant, name))).fetchone()
    assert row is not None
    return int(row[0])


def canonical_table(conn: Conn, tenant: str = TENANT) -> dict[int, Any]:
    """product id -> canonical JSONB of its rows, for every product with rows."""
    rows = conn.execute(
        sql.SQL(
            "SELECT r.product_id, r.images FROM imgmig.rows_images(%s, "
            "ARRAY(SELECT DISTINCT product_id FROM {})) r"
        ).format(table(tenant, "product_images")),
        (tenant,),
    ).fetchall()
    return {int(r[0]): r[1] for r in rows}
