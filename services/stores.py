"""Where images are read from and written to: the JSONB column or the table.

Both stores load a product's images as ``ImageView`` lists in order, and save a new list
against the old one. The service decides *what* the new list is; a store only knows how
to persist it. Tenant tables are reached through the models (``schema_translate_map``);
the canonical mapping is called in the fixed ``imgmig`` schema, never by tenant name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from cdc.errors import MalformedImagesError, ProductNotFoundError
from services.image_types import ImageView, fallback_id
from services.models import Product, ProductImage

PRODUCTS = cast(Table, Product.__table__)
IMAGES = cast(Table, ProductImage.__table__)
_META = ("alt_text", "mime_type", "file_size", "width", "height")

# The canonical mapping (cdc/sql/mapping_v1.sql): typed values in normalised order, and
# each element's canonical JSONB form (unknown keys kept through ``extra``).
_MAPPED = text(
    'SELECT r.url, r."order", r.is_label, r.alt_text, r.tags, r.mime_type, r.file_size, '
    'r.width, r.height, r.created_at, imgmig.row_to_element(r.url, r."order", r.is_label, '
    "r.alt_text, r.tags, r.mime_type, r.file_size, r.width, r.height, r.created_at, r.extra) "
    'FROM imgmig.images_to_rows(:images) AS r ORDER BY r."order"'
).bindparams(bindparam("images", type_=JSONB))


class Store(Protocol):
    def load(self, product_id: int, *, lock: bool = False) -> list[ImageView]: ...

    def save(self, product_id: int, before: list[ImageView], after: list[ImageView]) -> None: ...


def lock_product(session: Session, tenant: str, product_id: int, *, lock: bool) -> None:
    """Check the product exists; with ``lock``, take its row lock so edits serialise.

    ``FOR NO KEY UPDATE`` serialises edits of the product exactly like ``FOR UPDATE``
    (and like a legacy ``UPDATE products``), but does not block the ``KEY SHARE`` lock
    that inserting a ``product_images`` row takes for its foreign key.
    """
    _check_bigint(tenant, product_id)
    query = select(PRODUCTS.c.id).where(PRODUCTS.c.id == product_id)
    if lock:
        query = query.with_for_update(key_share=True)  # FOR NO KEY UPDATE
    if session.execute(query).first() is None:
        raise ProductNotFoundError(tenant=tenant, product_id=product_id)


def _check_bigint(tenant: str, product_id: int) -> None:
    """An id no bigint column can hold names no product (and must not reach SQL)."""
    if not -(2**63) <= product_id < 2**63:
        raise ProductNotFoundError(tenant=tenant, product_id=product_id)


def image_product(session: Session, image_id: int) -> int | None:
    """The product of a ``product_images`` row, or None."""
    if not 0 < image_id < 2**63:
        return None
    row = session.execute(select(IMAGES.c.product_id).where(IMAGES.c.id == image_id)).first()
    return None if row is None else int(row[0])


def _row_view(row: Any) -> ImageView:
    return ImageView(
        id=row.id, product_id=row.product_id, url=row.url, order=row.order,
        is_label=row.is_label, alt_text=row.alt_text, tags=tuple(row.tags or ()),
        mime_type=row.mime_type, file_size=row.file_size, width=row.width,
        height=row.height, created_at=row.created_at,
    )  # fmt: skip


class TableStore:
    """``product_images`` is the truth (stages ``table`` and ``contracted``)."""

    def __init__(self, session: Session, tenant: str) -> None:
        self.session = session
        self.tenant = tenant

    def load(self, product_id: int, *, lock: bool = False) -> list[ImageView]:
        lock_product(self.session, self.tenant, product_id, lock=lock)
        return self.rows(product_id)

    def rows(self, product_id: int) -> list[ImageView]:
        """The product's rows in order (no existence check)."""
        query = (
            select(IMAGES)
            .where(IMAGES.c.product_id == product_id)
            .order_by(IMAGES.c["order"], IMAGES.c.id)
        )
        return [_row_view(r) for r in self.session.execute(query)]

    def save(self, product_id: int, before: list[ImageView], after: list[ImageView]) -> None:
        """1. delete the rows that are gone; 2. update changed rows, labels cleared first
        (the one-label index never sees two); 3. insert the new ones."""
        kept = {v.id for v in after}
        gone = [v.id for v in before if v.id not in kept]
        if gone:
            self.session.execute(delete(IMAGES).where(IMAGES.c.id.in_(gone)))
        old = {v.id: v for v in before}
        changed = [(i, v) for i, v in enumerate(after) if v.id in old and _differs(old[v.id], v, i)]
        for i, view in sorted(changed, key=lambda c: c[1].is_label):
            values = _values(view, i) | _label_audit(old[view.id], view)
            self.session.execute(update(IMAGES).where(IMAGES.c.id == view.id).values(values))
        for i, view in enumerate(after):
            if view.id not in old:
                values = _values(view, i) | {"product_id": product_id, "url": view.url}
                values |= {"created_at": view.created_at or func.now()}
                values |= _label_audit(None, view)
                self.session.execute(insert(IMAGES).values(values))


def _differs(old: ImageView, new: ImageView, order: int) -> bool:
    return _state(old, old.order) != _state(new, order)


def _state(view: ImageView, order: int) -> tuple[object, ...]:
    return (order, view.is_label, view.tags, *(getattr(view, k) for k in _META))


def _values(view: ImageView, order: int) -> dict[str, Any]:
    values: dict[str, Any] = {k: getattr(view, k) for k in _META}
    return values | {
        "order": order,
        "is_label": view.is_label,
        "tags": list(view.tags),
        "updated_at": func.now(),
    }


def _label_audit(old: ImageView | None, new: ImageView) -> dict[str, Any]:
    """A label set or cleared through the service is explicit evidence (DESIGN, Labels)."""
    if (old is None and new.is_label) or (old is not None and old.is_label != new.is_label):
        return {"label_strategy": "explicit", "label_confidence": 1.0}
    return {}


class JsonbStore:
    """``products.images`` is the truth (stages ``jsonb``, ``dual_write``, ``shadow_read``).

    Ids come from the ``product_images`` row capture keeps for the element, matched as
    capture matches them: by url and rank among equal urls; else a fallback id.
    """

    def __init__(self, session: Session, tenant: str) -> None:
        self.session = session
        self.tenant = tenant
        self.table = TableStore(session, tenant)

    def load(self, product_id: int, *, lock: bool = False) -> list[ImageView]:
        _check_bigint(self.tenant, product_id)
        query = select(PRODUCTS.c.images).where(PRODUCTS.c.id == product_id)
        if lock:
            query = query.with_for_update(key_share=True)  # FOR NO KEY UPDATE
        found = self.session.execute(query).first()
        if found is None:
            raise ProductNotFoundError(tenant=self.tenant, product_id=product_id)
        mapped = self.session.execute(_MAPPED, {"images": found[0]}).all()
        return self._views(product_id, mapped, self.table.rows(product_id))

    def _views(
        self, product_id: int, mapped: Sequence[Any], rows: list[ImageView]
    ) -> list[ImageView]:
        by_key = {(r.url, k): r for r, k in _ranked(rows)}
        states = any(m.is_label is not None for m in mapped)
        views: list[ImageView] = []
        for m, k in _ranked(mapped):
            row = by_key.get((m.url, k))
            label = bool(m.is_label) if states else bool(row is not None and row.is_label)
            views.append(ImageView(
                id=row.id if row is not None else fallback_id(product_id, m.url, k),
                product_id=product_id, url=m.url, order=m.order, is_label=label,
                alt_text=m.alt_text, tags=tuple(m.tags or ()), mime_type=m.mime_type,
                file_size=m.file_size, width=m.width, height=m.height,
                created_at=m.created_at, raw=m[10],
            ))  # fmt: skip
        return views

    def save(self, product_id: int, before: list[ImageView], after: list[ImageView]) -> None:
        """Rewrite the array: known elements in the new order with their canonical keys,
        then any element the mapping cannot read, unchanged (it is never dropped)."""
        current = self.session.execute(
            select(PRODUCTS.c.images).where(PRODUCTS.c.id == product_id)
        ).scalar_one()
        if current is not None and not isinstance(current, list):
            kind = "object" if isinstance(current, dict) else type(current).__name__
            raise MalformedImagesError(tenant=self.tenant, product_id=product_id, kind=kind)
        unreadable = [e for e in current or [] if not _readable(e)]
        clear = (
            {v.id for v in before if v.is_label} if not any(v.is_label for v in after) else set()
        )
        elements = [_element(v, i, clear_label=v.id in clear) for i, v in enumerate(after)]
        self.session.execute(
            update(PRODUCTS)
            .where(PRODUCTS.c.id == product_id)
            .values(images=elements + unreadable, updated_at=func.now())
        )


def _ranked(items: Sequence[Any]) -> list[tuple[Any, int]]:
    """Each item with its rank among items of the same url (1-based, in list order)."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for item in items:
        seen[item.url] += 1
        out.append((item, seen[item.url]))
    return out


def _readable(element: object) -> bool:
    """The mapping's rule for an element it projects: an object with a non-empty url."""
    return (
        isinstance(element, dict) and isinstance(element.get("url"), str) and element["url"] != ""
    )


def _element(view: ImageView, order: int, *, clear_label: bool) -> dict[str, Any]:
    """Steps: 1. start from the canonical element (unknown keys survive); 2. set url,
    order and the metadata the view has; 3. state the label: true on the label; false on
    a former label when none is left (so capture clears a label the table alone knew);
    no key otherwise (one element stating a label decides for the whole product)."""
    el: dict[str, Any] = dict(view.raw or {})
    el["url"], el["order"] = view.url, order
    if "created_at" not in el and view.created_at is not None:
        el["created_at"] = view.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for key in _META:
        if getattr(view, key) is not None:
            el[key] = getattr(view, key)
    if view.tags:
        el["tags"] = list(view.tags)
    if view.is_label:
        el["is_label"] = True
    elif clear_label:
        el["is_label"] = False
    elif el.get("is_label") is True:
        del el["is_label"]
    return el


def now_utc() -> datetime:
    """created_at of a new image, at microsecond precision like the legacy format."""
    return datetime.now(UTC)
