"""``ProductImageService``: product images for the application, in every stage.

It takes a ``Session`` bound to the tenant (``services.db.tenant_session``) and never
commits: the caller owns the transaction, so a rejected call writes nothing.

* The first call in a transaction reads the tenant's stage under ``FOR KEY SHARE``
  on its state row and keeps it for the transaction. A stage change (``FOR UPDATE``)
  waits for the transactions in flight and is seen by the next one: no restart, no
  stale cache, and every service transaction takes this lock before any table lock, so a
  stage change (whose trigger DDL needs table locks) can never deadlock with it.
* Reads: JSONB in ``jsonb``, ``dual_write`` and ``shadow_read`` (plus the shadow
  comparison in ``shadow_read``), the table from ``table`` on.
* Writes lock the product row, so concurrent edits of one product serialise; then they
  write the stage's truth and let the trigger sync the other side (capture JSONB →
  table; reverse table → JSONB).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import cast

import structlog
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cdc import label_heuristics
from cdc.db import Conn
from cdc.errors import (
    ImageNotFoundError,
    LabelConflictError,
    NotAPermutationError,
    NotMigratedError,
    PhotoLimitError,
    ProductNotFoundError,
    StageChangedError,
)
from cdc.stage import Stage
from services import shadow
from services.image_types import (
    ImageView,
    ServiceSettings,
    fallback_id,
    product_of_fallback,
    without_labels,
)
from services.image_types import validate_new_image as validate
from services.stores import (
    JsonbStore,
    Store,
    TableStore,
    image_product,
    lock_product,
    now_utc,
)

_STAGE = text("SELECT stage FROM imgmig.tenant_state WHERE tenant = :tenant FOR KEY SHARE")
_MEMO = "imgmig.stage"  # session.info key: (transaction, tenant, stage)
# The setting tells the capture triggers who writes; the message tells the WAL reader
# (logical capture, cdc/logical.py), which cannot see settings. Any wal_level takes it.
_SOURCE = text(
    "SELECT set_config('imgmig.source', 'service', true), "
    "pg_logical_emit_message(true, 'imgmig.source', 'service')"
)
_PROJECTION = text("SELECT projection FROM imgmig.tenant_state WHERE tenant = :tenant")
TABLE_STAGES = (Stage.TABLE, Stage.CONTRACTED)
log = structlog.get_logger(__name__)

Change = Callable[[list[ImageView]], list[ImageView]]


class ProductImageService:
    """Add, delete, reorder and label a product's images; read photos and the label."""

    def __init__(self, session: Session, tenant: str, *, settings: ServiceSettings) -> None:
        self.session = session
        self.tenant = tenant
        self.settings = settings

    # -- reads ---------------------------------------------------------------------

    def list_images(self, product_id: int) -> list[ImageView]:
        """Every image of the product, label included, in order."""
        stage = self.stage()
        views = self._store(stage).load(product_id)
        if stage is Stage.SHADOW_READ:
            self._shadow(product_id, views)
        return views

    def get_product_photos(self, product_id: int) -> list[ImageView]:
        """The product's photos in order: every image except the label and any copy of it
        (the same url again, which only one row can flag)."""
        return without_labels(self.list_images(product_id))

    def get_label_image(self, product_id: int) -> ImageView | None:
        """The product's label image, if it has one."""
        return next((v for v in self.list_images(product_id) if v.is_label), None)

    def refresh_label(self, product_id: int) -> bool:
        """Before publishing: re-derive the product's heuristic label decision on its
        images as they are now (a legacy write since the last reconcile may have moved
        the label). A read-only check first: the product is locked, and its rows
        rewritten, only when the decision changes. True when the label moved."""
        stage = self.stage()
        if not self._table_current(stage):
            return False
        if not label_heuristics.stale_product(self._raw(), self.tenant, product_id):
            return False
        lock_product(self.session, self.tenant, product_id, lock=True)
        return self._refresh_label(product_id, stage)

    def find_image(self, image_id: int) -> ImageView:
        """One image by id."""
        self.stage()
        product_id = self._product_of(image_id)
        return self._pick(self.list_images(product_id), image_id, product_id)

    def image_product(self, image_id: int) -> int:
        """The product an image id belongs to, without reading the images (no shadow read)."""
        self.stage()
        return self._product_of(image_id)

    def stage(self) -> Stage:
        """The tenant's stage for this transaction, held under ``FOR KEY SHARE``.

        Read again on every call, a one-row key lookup: a savepoint rolled back by the
        caller releases the lock taken inside it, and a stage change could then go
        through. If the stage moved since this transaction first read it, the work done
        so far assumed the old one: :class:`StageChangedError`, and nothing commits.
        """
        memo = self.session.info.get(_MEMO)
        current = self.session.get_transaction()
        stage = self._load_stage()
        if memo is not None and current is not None and memo[:2] == (current, self.tenant):
            if Stage(memo[2]) is not stage:
                raise StageChangedError(tenant=self.tenant, was=memo[2], now=stage.value)
            return stage
        self.session.info[_MEMO] = (current, self.tenant, stage.value)
        if self.settings.heartbeat is not None:
            self.settings.heartbeat.beat(self.tenant, stage)
        return stage

    # -- writes --------------------------------------------------------------------

    def add_image(self, product_id: int, image_data: Mapping[str, object]) -> ImageView:
        """Append a validated image; it becomes the label if ``is_label`` says so."""
        new = validate(image_data, self.settings)
        view = ImageView(
            id=0, product_id=product_id, url=new.url, order=0, is_label=new.is_label,
            alt_text=new.alt_text, tags=new.tags, mime_type=new.mime_type,
            file_size=new.file_size, width=new.width, height=new.height, created_at=now_utc(),
        )  # fmt: skip

        def change(before: list[ImageView]) -> list[ImageView]:
            if new.is_label:
                self._no_other_label(product_id, before, None)
            elif sum(not v.is_label for v in before) >= self.settings.max_photos:
                raise PhotoLimitError(self.tenant, product_id, self.settings.max_photos)
            return [*before, view]

        after, index = self._write(product_id, change, lambda out: len(out) - 1)
        return after[index]

    def delete_image(self, image_id: int) -> None:
        """Remove one image; the others are renumbered 0..n-1 in their order."""

        def change(before: list[ImageView], image: ImageView) -> list[ImageView]:
            return [v for v in before if v.id != image.id]

        self._write_image(image_id, change)

    def reorder_images(self, product_id: int, new_order: Sequence[int]) -> list[ImageView]:
        """Put the images in ``new_order`` (image ids, each exactly once)."""

        def change(before: list[ImageView]) -> list[ImageView]:
            ids = [v.id for v in before]
            refused = NotAPermutationError(product_id, tuple(ids), tuple(new_order))
            try:  # fallback ids handed out earlier resolve to today's ids
                wanted = [self._pick(before, i, product_id).id for i in new_order]
            except ImageNotFoundError:
                raise refused from None
            if sorted(ids) != sorted(wanted) or len(set(wanted)) != len(wanted):
                raise refused
            by_id = {v.id: v for v in before}
            return [by_id[i] for i in wanted]

        return self._write(product_id, change)[0]

    def set_label_flag(self, image_id: int, is_label: bool) -> ImageView:
        """Mark or unmark one image as the label; a product has at most one label."""

        def change(before: list[ImageView], image: ImageView) -> list[ImageView]:
            if is_label:
                self._no_other_label(image.product_id, before, image.id)
            return [replace(v, is_label=is_label) if v.id == image.id else v for v in before]

        after, index = self._write_image(image_id, change)
        return after[index]

    # -- internals -----------------------------------------------------------------

    def _write(
        self, product_id: int, change: Change, index: Callable[[list[ImageView]], int] = len
    ) -> tuple[list[ImageView], int]:
        """Steps: 1. the stage, locked against a stage change; 2. the product, locked
        against other edits; 3. the new list from ``change`` (which raises on bad input,
        before anything is written); 4. save it; 5. reload (ids capture just assigned).
        Returns the reloaded list and ``index(new list)``: saves keep list positions."""
        stage = self.stage()
        self.session.execute(_SOURCE)
        store = self._store(stage)
        before = store.load(product_id, lock=True)
        after = change(before)
        store.save(product_id, before, after)
        self._refresh_label(product_id, stage)
        return store.load(product_id), index(after)

    def _refresh_label(self, product_id: int, stage: Stage) -> bool:
        """Re-derive a heuristic label decision the edit may have changed (an image
        appended after the label, then moved before it, must not leave the label
        published), where the table already holds the edit."""
        if not self._table_current(stage):
            return False
        if not label_heuristics.refresh_product(self._raw(), self.tenant, product_id):
            return False
        log.info("label decision refreshed", tenant=self.tenant, product_id=product_id)
        return True

    def _table_current(self, stage: Stage) -> bool:
        """Does ``product_images`` hold every committed edit? In table stages, and with
        the inline projection; a deferred tenant's table lags (the reconciler refreshes
        its labels once the projector caught up)."""
        if stage is Stage.JSONB:
            return False
        if stage in TABLE_STAGES:
            return True
        mode = self.session.execute(_PROJECTION, {"tenant": self.tenant}).scalar_one()
        return bool(mode == "inline")

    def _raw(self) -> Conn:
        """The session's psycopg connection, in the session's transaction."""
        return cast(Conn, self.session.connection().connection.driver_connection)

    def _write_image(
        self, image_id: int, change: Callable[[list[ImageView], ImageView], list[ImageView]]
    ) -> tuple[list[ImageView], int]:
        """``_write`` for an edit of one image: the position of that image is returned."""
        self.stage()  # the stage lock comes first, before any table is read
        product_id = self._product_of(image_id)
        position: list[int] = []

        def locate(before: list[ImageView]) -> list[ImageView]:
            image = self._pick(before, image_id, product_id)
            after = change(before, image)
            position.append(next((i for i, v in enumerate(after) if v.id == image.id), -1))
            return after

        try:
            after, _ = self._write(product_id, locate)
        except ProductNotFoundError:  # a fallback id naming a product that is not there
            raise ImageNotFoundError(tenant=self.tenant, image_id=image_id) from None
        return after, position[0]

    def _load_stage(self) -> Stage:
        stage = self.session.execute(_STAGE, {"tenant": self.tenant}).scalar_one_or_none()
        if stage is None:
            raise NotMigratedError(tenant=self.tenant)
        return Stage(stage)

    def _store(self, stage: Stage) -> Store:
        if stage in TABLE_STAGES:
            return TableStore(self.session, self.tenant)
        return JsonbStore(self.session, self.tenant)

    def _shadow(self, product_id: int, served: list[ImageView]) -> None:
        """Compare with the table in a savepoint: a failing shadow read never fails the
        served one."""
        try:
            with self.session.begin_nested():
                rows = TableStore(self.session, self.tenant).rows(product_id)
                diff = shadow.compare(served, rows)
                shadow.record(self.session, self.tenant, product_id, diff)
        except SQLAlchemyError as exc:
            log.warning("shadow read failed", tenant=self.tenant, product_id=product_id,
                        error=str(exc).splitlines()[0])  # fmt: skip

    def _product_of(self, image_id: int) -> int:
        found = product_of_fallback(image_id) if -(2**63) <= image_id < 0 else None
        if image_id > 0:
            found = image_product(self.session, image_id)
        if not found:
            raise ImageNotFoundError(tenant=self.tenant, image_id=image_id)
        return found

    def _pick(self, views: list[ImageView], image_id: int, product_id: int) -> ImageView:
        """The view with this id. A fallback id handed out before the image had a row
        (stage jsonb, or deferred projection) still finds it once the row exists."""
        for view in views:
            if view.id == image_id:
                return view
        if image_id < 0:
            ranks: dict[str, int] = {}
            for view in views:
                ranks[view.url] = ranks.get(view.url, 0) + 1
                if fallback_id(product_id, view.url, ranks[view.url]) == image_id:
                    return view
        raise ImageNotFoundError(tenant=self.tenant, image_id=image_id, product_id=product_id)

    def _no_other_label(self, product_id: int, views: list[ImageView], keep: int | None) -> None:
        for view in views:
            if view.is_label and view.id != keep:
                raise LabelConflictError(self.tenant, product_id, view.id)
