"""The label review queue: export uncertain decisions, let a person decide, apply them.

Strategies queue a product in ``imgmig.label_review`` when their decision is uncertain or
their signals disagree (``cdc.label_heuristics``); at most one open item per product.

1. :func:`export` writes the open items to CSV or JSON (by the file's suffix), with the
   product's image urls for context and an empty ``decision`` column.
2. A person fills ``decision``: ``label`` (the item's image is the label) or ``none``
   (the product has no label); a blank row is left open.
3. :func:`apply_file` applies the decisions in one transaction: per item it locks the
   product, clears any other label, then sets or clears ``is_label`` with strategy
   ``review`` and confidence 1.0, and records who decided and when. Items already decided
   or whose image is gone are counted as stale and left alone.

A ``review`` label is table-only knowledge, like any non-explicit strategy: verify does
not count it as drift while the JSONB element says nothing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, LiteralString

from psycopg import sql

from cdc import label_store
from cdc.db import Conn
from cdc.errors import ReviewFileError
from cdc.tenants import validate_name

STRATEGY: Final = "review"
DECISIONS: Final = ("label", "none")
COLUMNS: Final = (
    "id",
    "tenant",
    "product_id",
    "image_id",
    "url",
    "strategy",
    "confidence",
    "proposed",
    "reason",
    "images",
    "decision",
)


@dataclass(frozen=True)
class Item:
    """One open review item as exported; ``proposed`` is what the strategy decided."""

    id: int
    tenant: str
    product_id: int
    image_id: int | None
    url: str | None
    strategy: str
    confidence: float
    proposed: str
    reason: str
    images: list[str]
    decision: str = ""


_OPEN: LiteralString = """
SELECT q.id, q.tenant, q.product_id, q.image_id, q.url, q.strategy, q.confidence,
       q.proposed, q.reason
  FROM imgmig.label_review q
 WHERE q.decided_at IS NULL AND (%(tenants)s::text[] IS NULL OR q.tenant = ANY (%(tenants)s))
 ORDER BY q.tenant, q.product_id
"""


def open_items(conn: Conn, tenants: Sequence[str] | None = None) -> list[Item]:
    """The open items, each with its product's current image urls in order."""
    label_store.ensure(conn)
    wanted = list(tenants) if tenants is not None else None
    items = []
    for row in conn.execute(_OPEN, {"tenants": wanted}).fetchall():
        iid, tenant, pid, image_id, url, strategy, conf, proposed, reason = row
        items.append(
            Item(
                id=int(iid),
                tenant=str(tenant),
                product_id=int(pid),
                image_id=image_id,
                url=url,
                strategy=str(strategy),
                confidence=round(float(conf), 4),
                proposed="label" if proposed else "none",
                reason=str(reason),
                images=_urls(conn, str(tenant), int(pid)),
            )
        )
    return items


def _urls(conn: Conn, tenant: str, product_id: int) -> list[str]:
    query = sql.SQL('SELECT url FROM {} WHERE product_id = %s ORDER BY "order", id').format(
        sql.Identifier(validate_name(tenant), "product_images")
    )
    return [str(r[0]) for r in conn.execute(query, (product_id,)).fetchall()]


def export(conn: Conn, path: Path, tenants: Sequence[str] | None = None) -> int:
    """Write the open items to ``path`` (.json, else CSV); the number written."""
    items = open_items(conn, tenants)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([asdict(i) for i in items], indent=2) + "\n", encoding="utf-8")
        return len(items)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for item in items:
            writer.writerow({**asdict(item), "images": " ".join(item.images)})
    return len(items)


@dataclass(frozen=True)
class Decision:
    """A person's decision on one review item."""

    id: int
    decision: str


def read_file(path: Path) -> list[Decision]:
    """The filled-in decisions of an exported file; blank decisions are skipped."""
    if not path.exists():
        raise ReviewFileError(path=str(path), reason="no such file")
    records: list[dict[str, Any]]
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ReviewFileError(path=str(path), reason=f"bad JSON: {exc}") from exc
        if not isinstance(loaded, list) or not all(isinstance(r, dict) for r in loaded):
            raise ReviewFileError(path=str(path), reason="expected a list of objects")
        records = loaded
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"id", "decision"} <= set(reader.fieldnames or ()):
                raise ReviewFileError(path=str(path), reason="columns id and decision needed")
            records = list(reader)
    return [d for n, r in enumerate(records, 1) if (d := _decision(path, n, r)) is not None]


def _decision(path: Path, n: int, rec: dict[str, Any]) -> Decision | None:
    value = str(rec.get("decision") or "").strip().lower()
    if not value:
        return None
    ident = str(rec.get("id") or "").strip()
    if value not in DECISIONS or not ident.isdigit():
        why = f"record {n}: id must be a number and decision one of {', '.join(DECISIONS)}"
        raise ReviewFileError(path=str(path), reason=why)
    return Decision(id=int(ident), decision=value)


@dataclass(frozen=True)
class ApplyResult:
    """Decisions applied, and those left alone (already decided, or the image is gone)."""

    applied: int
    stale: int


_CLAIM: LiteralString = """
SELECT tenant, product_id, image_id FROM imgmig.label_review
 WHERE id = %s AND decided_at IS NULL FOR UPDATE
"""
_CLEAR: LiteralString = """
UPDATE {images} SET is_label = false, label_strategy = %(strategy)s, label_confidence = 1,
       updated_at = now()
 WHERE product_id = %(pid)s AND id IS DISTINCT FROM %(keep)s
"""
_SET: LiteralString = """
UPDATE {images} SET is_label = true, label_strategy = %(strategy)s, label_confidence = 1,
       updated_at = now()
 WHERE product_id = %(pid)s AND id = %(keep)s
"""
_DONE: LiteralString = """
UPDATE imgmig.label_review SET decision = %s, decided_by = %s, decided_at = now() WHERE id = %s
"""


def apply_decisions(conn: Conn, decisions: Sequence[Decision], *, by: str) -> ApplyResult:
    """Apply ``decisions`` in one transaction, recording ``by`` and the time."""
    label_store.ensure(conn)
    applied = stale = 0
    with conn.transaction():
        for d in decisions:
            if _apply_one(conn, d, by):
                applied += 1
            else:
                stale += 1
    return ApplyResult(applied=applied, stale=stale)


def _apply_one(conn: Conn, d: Decision, by: str) -> bool:
    claim = conn.execute(_CLAIM, (d.id,)).fetchone()
    if claim is None:
        return False
    tenant, pid, image_id = validate_name(str(claim[0])), int(claim[1]), claim[2]
    images = sql.Identifier(tenant, "product_images")
    # Serialise with the capture trigger and the service, which lock the product first.
    locked = conn.execute(
        sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR NO KEY UPDATE").format(
            sql.Identifier(tenant, "products")
        ),
        (pid,),
    ).fetchone()
    keep = image_id if d.decision == "label" else None
    exists = conn.execute(
        sql.SQL("SELECT 1 FROM {} WHERE product_id = %s AND id = %s").format(images),
        (pid, image_id),
    ).fetchone()
    if locked is None or (keep is not None and exists is None):
        return False
    params = {"strategy": STRATEGY, "pid": pid, "keep": keep}
    # Clear first, then set: the one-label index is checked row by row.
    conn.execute(sql.SQL(_CLEAR).format(images=images), params)
    if keep is not None:
        conn.execute(sql.SQL(_SET).format(images=images), params)
    conn.execute(_DONE, (d.decision, by, d.id))
    return True


def apply_file(conn: Conn, path: Path, *, by: str) -> ApplyResult:
    """Read a filled-in export and apply it (all or nothing on a bad file)."""
    return apply_decisions(conn, read_file(path), by=by)
