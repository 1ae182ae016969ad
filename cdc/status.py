"""What the operator sees: per tenant, products, images on both sides, and the stage."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from cdc import stage as stage_mod
from cdc.db import Conn, Query
from cdc.tenants import resolve


@dataclass(frozen=True)
class TenantSummary:
    tenant: str
    products: int
    jsonb_images: int | None  # None once the column is gone
    table_images: int | None  # None before the expand migration
    stage: str


def _has_column(conn: Conn, tenant: str, table: str, column: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s AND column_name = %s",
        (tenant, table, column),
    ).fetchone()
    return row is not None


def _count(conn: Conn, query: Query) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def summarize(conn: Conn, tenants: list[str] | None = None) -> list[TenantSummary]:
    """One summary per tenant (all tenants by default)."""
    states = {s.tenant: s.stage.value for s in stage_mod.get_all(conn, tenants)}
    out = []
    for tenant in resolve(conn, tenants):
        products = sql.Identifier(tenant, "products")
        images = sql.Identifier(tenant, "product_images")
        jsonb = None
        if _has_column(conn, tenant, "products", "images"):
            jsonb = _count(
                conn,
                sql.SQL(
                    "SELECT sum(CASE jsonb_typeof(images) WHEN 'array' "
                    "THEN jsonb_array_length(images) END) FROM {}"
                ).format(products),
            )
        table = None
        if _has_column(conn, tenant, "product_images", "id"):
            table = _count(conn, sql.SQL("SELECT count(*) FROM {}").format(images))
        out.append(
            TenantSummary(
                tenant=tenant,
                products=_count(conn, sql.SQL("SELECT count(*) FROM {}").format(products)),
                jsonb_images=jsonb,
                table_images=table,
                stage=states.get(tenant, "not migrated"),
            )
        )
    return out
