"""Verify (read-only): per product, is ``product_images`` the canonical form of the JSONB?

Per tenant, in keyset batches over ``products.id``:

1. one statement compares, per product, ``imgmig.images_hash(images)`` with the md5 of the
   rows read back through ``imgmig.row_to_element`` (the same canonical mapping); it also
   flags sources with problems (``imgmig.images_problems``);
2. products whose hashes differ are classified element by element, pairing elements and
   rows by (url, rank among equal urls) as the capture projection does:
   ``missing`` (element without row), ``extra`` (row without element), ``order`` (paired,
   other position), ``field`` (paired, any other value differs). ``missing`` and
   ``extra`` are relative to the stage's source of truth: at stage ``table`` a row without
   an element is missing from the JSONB.

Stage decides what "equal" means. In ``dual_write``/``shadow_read`` the JSONB is the
truth and the rows must be its exact projection (``order`` included); a label that a
heuristic strategy decided (``label_strategy`` not ``explicit``) is table-only knowledge
and is not drift while the element says nothing. In ``table`` the reverse trigger mirrors
the rows into JSONB, so both sides are compared in canonical form.

``malformed_source`` counts products whose JSONB has problems. It is reported but not
drift: the mapping projects such arrays deterministically and the original is kept in
the event log, so there is nothing to repair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, LiteralString

from psycopg import sql

from cdc.db import Conn
from cdc.stage import Stage

CLASSES: Final = ("missing", "extra", "order", "field")
MALFORMED: Final = "malformed_source"
BATCH: Final = 2000

# Rows side, element by element; {label} masks heuristic labels in JSONB stages.
_ROW_ELEMENT: LiteralString = (
    "imgmig.row_to_element(t.url, {order}, {label}, t.alt_text, t.tags, t.mime_type, "
    "t.file_size, t.width, t.height, t.created_at, t.extra)"
)

_CHECK: LiteralString = """
WITH p AS (
    SELECT id, images FROM {products} WHERE {where} ORDER BY id LIMIT %(limit)s
), r AS (
    SELECT t.product_id, jsonb_agg({element} ORDER BY t."order", t.id) AS images
      FROM {images} t WHERE t.product_id IN (SELECT id FROM p) GROUP BY t.product_id
)
SELECT p.id,
       imgmig.images_hash(p.images) IS DISTINCT FROM {rows_hash},
       imgmig.images_problems(p.images) IS NOT NULL
  FROM p LEFT JOIN r ON r.product_id = p.id
 ORDER BY p.id
"""

_CLASSIFY: LiteralString = """
WITH e AS (
    SELECT p.id AS pid, m.*,
           row_number() OVER (PARTITION BY p.id, m.url ORDER BY m."order") AS k
      FROM {products} p CROSS JOIN LATERAL imgmig.images_to_rows(p.images) AS m
     WHERE p.id = ANY (%(ids)s)
), t AS (
    SELECT r.*,
           (row_number() OVER (PARTITION BY r.product_id ORDER BY r."order", r.id) - 1)::int
               AS rank,
           row_number() OVER (PARTITION BY r.product_id, r.url ORDER BY r."order", r.id) AS k
      FROM {images} r WHERE r.product_id = ANY (%(ids)s)
), pair AS (
    SELECT coalesce(e.pid, t.product_id) AS pid, e.url IS NOT NULL AS has_e,
           t.id IS NOT NULL AS has_r, e."order" AS e_order, {row_order} AS r_order,
           imgmig.row_to_element(e.url, 0, e.is_label, e.alt_text, e.tags, e.mime_type,
                                 e.file_size, e.width, e.height, e.created_at, e.extra) AS e_el,
           {pair_element} AS r_el
      FROM e FULL JOIN t ON t.product_id = e.pid AND t.url = e.url AND t.k = e.k
)
SELECT pid,
       bool_or(has_e AND NOT has_r),
       bool_or(has_r AND NOT has_e),
       bool_or(has_e AND has_r AND e_order IS DISTINCT FROM r_order),
       bool_or(has_e AND has_r AND e_el IS DISTINCT FROM r_el)
  FROM pair GROUP BY pid ORDER BY pid
"""

# A heuristic label is table-only knowledge in JSONB stages.
_HEURISTIC: LiteralString = "t.label_strategy IS NOT NULL AND t.label_strategy <> 'explicit'"


def jsonb_is_truth(stage: Stage) -> bool:
    return stage in (Stage.JSONB, Stage.DUAL_WRITE, Stage.SHADOW_READ)


def check_statement(tenant: str, stage: Stage, *, by_ids: bool = False) -> sql.Composed:
    """The hash comparison for one batch (golden-tested)."""
    strict = jsonb_is_truth(stage)
    label = f"t.is_label AND NOT ({_HEURISTIC})" if strict else "t.is_label"
    element = sql.SQL(_ROW_ELEMENT).format(order=sql.SQL('t."order"'), label=sql.SQL(label))
    rows_hash = (
        "md5(coalesce(r.images, '[]'::jsonb)::text)"
        if strict
        else "imgmig.images_hash(coalesce(r.images, '[]'::jsonb))"
    )
    where = "id = ANY (%(ids)s)" if by_ids else "id > %(after)s"
    return sql.SQL(_CHECK).format(
        products=sql.Identifier(tenant, "products"),
        images=sql.Identifier(tenant, "product_images"),
        where=sql.SQL(where),
        element=element,
        rows_hash=sql.SQL(rows_hash),
    )


def classify_statement(tenant: str, stage: Stage) -> sql.Composed:
    """The element-by-element classification of some products (golden-tested)."""
    strict = jsonb_is_truth(stage)
    label = f"t.is_label AND NOT (e.is_label IS NULL AND {_HEURISTIC})" if strict else "t.is_label"
    return sql.SQL(_CLASSIFY).format(
        products=sql.Identifier(tenant, "products"),
        images=sql.Identifier(tenant, "product_images"),
        row_order=sql.SQL('t."order"' if strict else "t.rank"),
        pair_element=sql.SQL(_ROW_ELEMENT).format(order=sql.SQL("0"), label=sql.SQL(label)),
    )


@dataclass
class Report:
    """What one verify pass found in one tenant. Counts are products."""

    tenant: str
    stage: Stage
    products_checked: int = 0
    drift: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*CLASSES, MALFORMED), 0))
    drifted: list[int] = field(default_factory=list)

    @property
    def drift_total(self) -> int:
        return len(self.drifted)


def check(conn: Conn, tenant: str, stage: Stage, *, batch: int = BATCH) -> Report:
    """Verify every product of ``tenant``."""
    report = Report(tenant, stage)
    stmt = check_statement(tenant, stage)
    after = 0
    while True:
        rows = conn.execute(stmt, {"after": after, "limit": batch}).fetchall()
        if not rows:
            return report
        _account(conn, report, rows)
        after = int(rows[-1][0])


def check_ids(conn: Conn, tenant: str, stage: Stage, ids: Sequence[int]) -> Report:
    """Verify only the products ``ids`` (after a repair)."""
    report = Report(tenant, stage)
    rows = conn.execute(
        check_statement(tenant, stage, by_ids=True), {"ids": list(ids), "limit": len(ids)}
    ).fetchall()
    _account(conn, report, rows)
    return report


def _account(conn: Conn, report: Report, rows: Sequence[tuple[object, ...]]) -> None:
    report.products_checked += len(rows)
    report.drift[MALFORMED] += sum(1 for r in rows if r[2])
    differing = [int(str(r[0])) for r in rows if r[1]]
    if not differing:
        return
    classified = conn.execute(
        classify_statement(report.tenant, report.stage), {"ids": differing}
    ).fetchall()
    for pid, *flags in classified:
        if not any(flags):
            continue  # the hash differed only by a heuristic label: not drift
        if not jsonb_is_truth(report.stage):
            flags[0], flags[1] = flags[1], flags[0]  # the rows are the truth now
        report.drifted.append(int(pid))
        for name, flag in zip(CLASSES, flags, strict=True):
            report.drift[name] += bool(flag)
