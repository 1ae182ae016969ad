"""Shared helpers for the backfill, verify and reconcile tests (not a test module)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from cdc import migrate
from cdc import stage as stage_mod
from cdc.db import Query, connect
from cdc.seed import SeedConfig, seed

TENANTS = ("user_1", "user_2", "user_4", "user_5")
T = "user_1"


def set_stage(url: str, stage: str, tenants: tuple[str, ...] = TENANTS) -> None:
    """Move tenants to ``stage`` (installs the stage's triggers)."""
    with connect(url) as conn:
        for tenant in tenants:
            stage_mod.set_stage(conn, tenant, stage, reason="test")
        conn.commit()


def one_tenant(url: str, products: int) -> str:
    """One tenant with ``products`` products, migrated, in dual_write."""
    with psycopg.connect(url) as conn:
        config = SeedConfig(tenants=1, products=products, labels=products // 5, seed=11)
        seed(conn, config)
    migrate.upgrade(url)
    set_stage(url, "dual_write", (T,))
    return url


def last_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT last_id FROM imgmig.backfill_state WHERE tenant = %s", (T,)
    ).fetchone()
    return int(row[0]) if row else 0


def scalar(conn: psycopg.Connection[Any], query: Query, *args: object) -> Any:
    row = conn.execute(query, args or None).fetchone()
    assert row is not None
    return row[0]


def ident(tenant: str, table: str) -> sql.Identifier:
    return sql.Identifier(tenant, table)


def exact_mismatches(
    conn: psycopg.Connection[Any], tenant: str, *, up_to: int | None = None
) -> int:
    """Products (with ``id <= up_to`` if given) whose rows are not exactly the canonical
    mapping of their JSONB.

    Independent of cdc.verify: compares the mapping's canonical array with the rows read
    back through the mapping (order, duplicates and missing rows all show up).
    """
    query = sql.SQL(
        """SELECT count(*) FROM {products} p
            WHERE (p.id <= {up_to} OR {up_to} IS NULL)
              AND imgmig.images_canonical(p.images)
                  IS DISTINCT FROM (SELECT r.images FROM imgmig.rows_images({t}, ARRAY[p.id]) r)"""
    ).format(
        products=ident(tenant, "products"),
        t=sql.Literal(tenant),
        up_to=sql.Literal(up_to) + sql.SQL("::bigint"),
    )
    return int(scalar(conn, query))


def orphan_rows(conn: psycopg.Connection[Any], tenant: str) -> int:
    """Rows whose product does not exist (what the product_id foreign key forbids)."""
    query = sql.SQL(
        "SELECT count(*) FROM {images} r "
        "WHERE NOT EXISTS (SELECT 1 FROM {products} p WHERE p.id = r.product_id)"
    ).format(images=ident(tenant, "product_images"), products=ident(tenant, "products"))
    return int(scalar(conn, query))


def duplicate_orders(conn: psycopg.Connection[Any], tenant: str) -> int:
    query = sql.SQL(
        'SELECT count(*) FROM (SELECT product_id, "order" FROM {} '
        "GROUP BY 1, 2 HAVING count(*) > 1) d"
    ).format(ident(tenant, "product_images"))
    return int(scalar(conn, query))
