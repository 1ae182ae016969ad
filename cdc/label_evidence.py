"""Importable label evidence: the legacy ``image_type`` from before the JSONB migration.

The backup restored from before 2026-01-03 still knew, per image url, whether it was a
``photo`` or a ``label``. It is imported into ``imgmig.label_evidence`` (from the
restored schema or from a CSV file), idempotently: one row per (tenant, product, url),
re-importing updates in place and reports what changed.

The ``legacy-image-type`` strategy then decides, per undecided product:

1. a current image whose url is a ``label`` in the evidence is the label;
2. a product whose every current image is a ``photo`` in the evidence has no label. The
   decision is kept on its rows (``is_label = false`` with the strategy's name), so later,
   weaker strategies leave the product alone;
3. anything else (no evidence, or images added after the backup) is left to the next
   strategy, which must not pick an image the evidence calls a photo.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, LiteralString

from psycopg import sql

from cdc import label_store
from cdc.db import Conn
from cdc.errors import EvidenceSourceError
from cdc.tenants import TENANT_PATTERN

LEGACY_SCHEMA: Final = "legacy_backup"
LEGACY_TABLE: Final = "image_types"
CSV_COLUMNS: Final = ("tenant", "product_id", "url", "image_type")
IMAGE_TYPES: Final = ("photo", "label")


@dataclass(frozen=True)
class ImportResult:
    """What one import did: rows read, rows new, rows whose type or source changed."""

    read: int
    inserted: int
    updated: int


# A url listed twice for one product keeps its 'label' row (the stronger fact).
_UPSERT: LiteralString = """
WITH src AS (
    SELECT DISTINCT ON (s.tenant, s.product_id, s.url)
           s.tenant, s.product_id, s.url, s.image_type
      FROM {source} s
     WHERE s.tenant ~ '^(user_[0-9]+|template_tenant)$'
     ORDER BY s.tenant, s.product_id, s.url, s.image_type = 'label' DESC
), up AS (
    INSERT INTO imgmig.label_evidence AS e (tenant, product_id, url, image_type, source)
    SELECT tenant, product_id, url, image_type, %(source)s FROM src
    ON CONFLICT (tenant, product_id, url) DO UPDATE
       SET image_type = excluded.image_type, source = excluded.source, imported_at = now()
     WHERE (e.image_type, e.source) IS DISTINCT FROM (excluded.image_type, excluded.source)
    RETURNING (xmax = 0) AS inserted
)
SELECT (SELECT count(*) FROM src),
       (SELECT count(*) FROM up WHERE inserted),
       (SELECT count(*) FROM up WHERE NOT inserted)
"""


def upsert_statement(source: sql.Composable) -> sql.Composed:
    """The idempotent import from a relation with (tenant, product_id, url, image_type)."""
    return sql.SQL(_UPSERT).format(source=source)


def _upsert(conn: Conn, source: sql.Composable, label: str) -> ImportResult:
    row = conn.execute(upsert_statement(source), {"source": label}).fetchone()
    assert row is not None
    return ImportResult(read=int(row[0]), inserted=int(row[1]), updated=int(row[2]))


def import_legacy(conn: Conn, *, schema: str = LEGACY_SCHEMA) -> ImportResult:
    """Import ``schema.image_types`` (the restored backup) into ``imgmig.label_evidence``."""
    label_store.ensure(conn)
    if not legacy_present(conn, schema=schema):
        raise EvidenceSourceError(source=f"{schema}.{LEGACY_TABLE}", reason="no such table")
    with conn.transaction():
        return _upsert(conn, sql.Identifier(schema, LEGACY_TABLE), f"{schema}.{LEGACY_TABLE}")


def read_csv(path: Path) -> list[tuple[str, int, str, str]]:
    """Rows of an evidence CSV (header: tenant,product_id,url,image_type), validated."""
    rows: list[tuple[str, int, str, str]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise EvidenceSourceError(source=str(path), reason=f"missing columns {missing}")
        for line, rec in enumerate(reader, start=2):
            rows.append(_csv_row(path, line, rec))
    return rows


def _csv_row(path: Path, line: int, rec: dict[str, str]) -> tuple[str, int, str, str]:
    tenant, pid, url, kind = (str(rec.get(c) or "").strip() for c in CSV_COLUMNS)
    problem = None
    if not TENANT_PATTERN.match(tenant):
        problem = f"bad tenant {tenant!r}"
    elif not pid.isdigit():
        problem = f"bad product_id {pid!r}"
    elif not url:
        problem = "empty url"
    elif kind not in IMAGE_TYPES:
        problem = f"image_type must be photo or label, not {kind!r}"
    if problem:
        raise EvidenceSourceError(source=f"{path}:{line}", reason=problem)
    return tenant, int(pid), url, kind


def import_csv(conn: Conn, path: Path) -> ImportResult:
    """Import an evidence CSV file into ``imgmig.label_evidence`` (all or nothing)."""
    rows = read_csv(path)
    label_store.ensure(conn)
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE label_evidence_in (tenant text, product_id bigint, url text,"
            " image_type text) ON COMMIT DROP"
        )
        with conn.cursor().copy(
            "COPY label_evidence_in (tenant, product_id, url, image_type) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        return _upsert(conn, sql.Identifier("label_evidence_in"), f"csv:{path.name}")


@dataclass(frozen=True)
class LegacyImageType:
    """Labels the image the legacy backup called a label; records "no label" too."""

    name: str = "legacy-image-type"
    confidence: float = 0.99

    def pick_sql(self) -> LiteralString:
        return _PICK

    def apply_batch(self, conn: Conn, tenant: str, ids: Sequence[int]) -> int:
        """Decide the undecided products of ``ids`` from the evidence; labels set."""
        label_store.ensure(conn)
        cur = conn.execute(
            apply_statement(tenant),
            {"ids": list(ids), "tenant": tenant, "name": self.name, "conf": self.confidence},
        )
        row = cur.fetchone()
        return int(row[0]) if row else 0


# The image whose url is a legacy label (one per product: the first by order).
_PICK: LiteralString = """
    SELECT DISTINCT ON (r.product_id) r.product_id, r.id AS image_id
      FROM {images} r
      JOIN undecided u ON u.product_id = r.product_id
      JOIN imgmig.label_evidence e
        ON e.tenant = %(tenant)s AND e.product_id = r.product_id AND e.url = r.url
     WHERE e.image_type = 'label'
     ORDER BY r.product_id, r."order", r.id
"""

# Products that have rows, every one of them a legacy photo.
_NONE: LiteralString = """
    SELECT u.product_id
      FROM undecided u
     WHERE EXISTS (SELECT 1 FROM {images} r WHERE r.product_id = u.product_id)
       AND NOT EXISTS (
           SELECT 1 FROM {images} r
            WHERE r.product_id = u.product_id
              AND NOT EXISTS (SELECT 1 FROM imgmig.label_evidence e
                               WHERE e.tenant = %(tenant)s AND e.product_id = r.product_id
                                 AND e.url = r.url AND e.image_type = 'photo'))
"""

_APPLY: LiteralString = """
WITH undecided AS ({undecided}),
pick AS ({pick}),
decided AS (
    SELECT product_id, image_id FROM pick
    UNION ALL
    SELECT product_id, NULL::bigint FROM ({none}) n
), upd AS (
    UPDATE {images} r
       SET is_label = r.id IS NOT DISTINCT FROM d.image_id,
           label_strategy = %(name)s, label_confidence = %(conf)s, updated_at = now()
      FROM decided d
     WHERE r.product_id = d.product_id
    RETURNING r.is_label
)
SELECT count(*) FILTER (WHERE is_label) FROM upd
"""


def apply_statement(tenant: str) -> sql.Composed:
    """The one statement that applies the legacy evidence to a batch (golden-tested)."""
    images = sql.Identifier(tenant, "product_images")
    products = sql.Identifier(tenant, "products")
    return sql.SQL(_APPLY).format(
        undecided=sql.SQL(label_store.UNDECIDED).format(products=products, images=images),
        pick=sql.SQL(_PICK).format(images=images),
        none=sql.SQL(_NONE).format(images=images),
        images=images,
    )


def evidence_counts(conn: Conn) -> dict[str, int]:
    """Evidence rows per image_type (for the report)."""
    label_store.ensure(conn)
    rows = conn.execute(
        "SELECT image_type, count(*) FROM imgmig.label_evidence GROUP BY 1"
    ).fetchall()
    return {str(k): int(n) for k, n in rows}


def legacy_present(conn: Conn, *, schema: str = LEGACY_SCHEMA) -> bool:
    """Whether the restored backup table is there to import."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        (schema, LEGACY_TABLE),
    ).fetchone()
    return bool(row and row[0])
