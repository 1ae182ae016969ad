"""Control tables of label detection, created idempotently from code.

* ``imgmig.label_evidence``: imported facts about images (the legacy ``image_type``), one
  row per (tenant, product, url); re-importing updates in place.
* ``imgmig.label_calibration``: likelihood ratios per heuristic feature bin, measured on
  the products that have evidence (``cdc.label_heuristics.calibrate``).
* ``imgmig.label_review``: the review queue; at most one open item per product.

They live outside Alembic on purpose: they are label bookkeeping, not part of the
expand/contract of ``products.images``, and every entry point that needs them calls
:func:`ensure` (serialised by a transaction advisory lock, as ``cdc.capture`` does).
"""

from __future__ import annotations

from typing import Final, LiteralString

from cdc.db import Conn

LOCK: Final = "imgmig.label-tables"

_DDL: Final[tuple[LiteralString, ...]] = (
    "CREATE SCHEMA IF NOT EXISTS imgmig",
    """CREATE TABLE IF NOT EXISTS imgmig.label_evidence (
        tenant text NOT NULL,
        product_id bigint NOT NULL,
        url text NOT NULL,
        image_type text NOT NULL CHECK (image_type IN ('photo', 'label')),
        source text NOT NULL,
        imported_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant, product_id, url)
    )""",
    """CREATE TABLE IF NOT EXISTS imgmig.label_calibration (
        feature text NOT NULL,
        bin text NOT NULL,
        n_label integer NOT NULL,
        n_photo integer NOT NULL,
        lr double precision NOT NULL CHECK (lr > 0),
        computed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (feature, bin)
    )""",
    """CREATE TABLE IF NOT EXISTS imgmig.label_review (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant text NOT NULL,
        product_id bigint NOT NULL,
        image_id bigint,
        url text,
        strategy text NOT NULL,
        confidence real NOT NULL CHECK (confidence BETWEEN 0 AND 1),
        proposed boolean NOT NULL,
        reason text NOT NULL,
        decision text CHECK (decision IN ('label', 'none')),
        decided_by text,
        decided_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE UNIQUE INDEX IF NOT EXISTS label_review_one_open_uidx
        ON imgmig.label_review (tenant, product_id) WHERE decided_at IS NULL""",
)


def ensure(conn: Conn) -> None:
    """Create the label control tables if they are missing (idempotent, concurrency-safe)."""
    present = conn.execute(
        "SELECT to_regclass('imgmig.label_evidence') IS NOT NULL"
        " AND to_regclass('imgmig.label_calibration') IS NOT NULL"
        " AND to_regclass('imgmig.label_review') IS NOT NULL"
    ).fetchone()
    if present and present[0]:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (LOCK,))
        for statement in _DDL:
            conn.execute(statement)


# Products of a batch that nobody has decided yet: no element states is_label (explicit
# evidence, read through the canonical mapping) and no row is a label or carries a
# strategy (a strategy that decided "no label" leaves its name on the product's rows).
UNDECIDED: Final[LiteralString] = """
    SELECT p.id AS product_id
      FROM {products} p
     WHERE p.id = ANY (%(ids)s)
       AND NOT EXISTS (SELECT 1 FROM imgmig.images_to_rows(p.images) m
                        WHERE m.is_label IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM {images} r
                        WHERE r.product_id = p.id
                          AND (r.is_label OR r.label_strategy IS NOT NULL))
"""
