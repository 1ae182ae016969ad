"""Shadow reads: in ``shadow_read`` the service serves JSONB and checks the table behind it.

Each shadow read compares what JSONB says with what ``product_images`` holds, logs every
mismatch with structlog (tenant, product, difference), stores it in
``imgmig.shadow_mismatches`` and counts the read in ``imgmig.shadow_stats``. The ``table``
guard needs reads and zero mismatches there (cdc.cutover).

Only what JSONB states is compared: the images, their order, the label, and metadata keys
present in JSONB. Metadata the table alone holds (enrichment) is not a mismatch.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.image_types import ImageView

log = structlog.get_logger(__name__)

_META = ("alt_text", "mime_type", "file_size", "width", "height")

_COUNT = text(
    "INSERT INTO imgmig.shadow_stats AS s (tenant, reads, mismatches) "
    "VALUES (:tenant, 1, :bad) ON CONFLICT (tenant) DO UPDATE "
    "SET reads = s.reads + 1, mismatches = s.mismatches + excluded.mismatches"
)
COUNTER_LOCK_TIMEOUT = "50ms"
_TIMEOUT_NOW = text("SELECT current_setting('lock_timeout')")
_TIMEOUT = text("SELECT set_config('lock_timeout', :value, true)")
_SAMPLE = text(
    "INSERT INTO imgmig.shadow_mismatches (tenant, product_id, diff) "
    "VALUES (:tenant, :product_id, :diff)"
).bindparams(bindparam("diff", type_=JSONB))


def compare(served: list[ImageView], table: list[ImageView]) -> dict[str, Any]:
    """The differences between the JSONB view and the table rows; empty when they agree."""
    diff: dict[str, Any] = {}
    urls = [v.url for v in served]
    rows = [r.url for r in table]
    missing = [u for u in urls if u not in rows]
    extra = [u for u in rows if u not in urls]
    if missing:
        diff["missing_in_table"] = missing
    if extra:
        diff["extra_in_table"] = extra
    if not missing and not extra and urls != rows:
        diff["order"] = {"jsonb": urls, "table": rows}
    if urls == rows:
        fields = [f for v, r in zip(served, table, strict=True) for f in _field_diffs(v, r)]
        if fields:
            diff["fields"] = fields
    return diff


def _field_diffs(served: ImageView, row: ImageView) -> list[dict[str, Any]]:
    out = []
    if served.is_label != row.is_label:
        out.append({"url": served.url, "field": "is_label", "jsonb": served.is_label,
                    "table": row.is_label})  # fmt: skip
    for key in _META:
        mine, theirs = getattr(served, key), getattr(row, key)
        if mine is not None and mine != theirs:
            out.append({"url": served.url, "field": key, "jsonb": mine, "table": theirs})
    if served.tags and served.tags != row.tags:
        out.append({"url": served.url, "field": "tags", "jsonb": list(served.tags),
                    "table": list(row.tags)})  # fmt: skip
    return out


def record(session: Session, tenant: str, product_id: int, diff: dict[str, Any]) -> None:
    """Keep and log the mismatch if there is one, then count the read.

    Runs in the caller's transaction. The mismatch row is a plain insert (it never
    waits). The counter is one hot row per tenant: it is updated under a short
    ``lock_timeout``, and skipped when busy, so a caller holding a product lock can never
    deadlock on it with a caller holding the counter. A skipped count only under-counts
    reads; the ``table`` guard counts mismatches from ``shadow_mismatches`` too.
    """
    if diff:
        log.warning("shadow mismatch", tenant=tenant, product_id=product_id, diff=diff)
        session.execute(_SAMPLE, {"tenant": tenant, "product_id": product_id, "diff": diff})
    previous = session.execute(_TIMEOUT_NOW).scalar_one()
    try:
        with session.begin_nested():
            session.execute(_TIMEOUT, {"value": COUNTER_LOCK_TIMEOUT})
            session.execute(_COUNT, {"tenant": tenant, "bad": 1 if diff else 0})
            session.execute(_TIMEOUT, {"value": previous})
    except OperationalError as exc:  # LockNotAvailable: the savepoint undid the SET too
        log.debug("shadow counter busy", tenant=tenant, error=str(exc).splitlines()[0])
