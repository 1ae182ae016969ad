"""Bad input to ProductImageService: a typed error, and no partial write, in every stage."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cdc.errors import (
    ImageNotFoundError,
    ImageServiceError,
    InvalidImageError,
    LabelConflictError,
    MalformedImagesError,
    NotAPermutationError,
    PhotoLimitError,
    ProductNotFoundError,
)
from cdc.stage import Stage
from services.image_service import ProductImageService
from services.image_types import ServiceSettings
from tests.cutover_helpers import PG, bring_to, engine_for, service, snapshot, tq

T = "user_4"
P = 3
STAGES = (Stage.JSONB, Stage.DUAL_WRITE, Stage.TABLE)
Call = Callable[[ProductImageService, list[int]], object]


OK: dict[str, object] = {"url": "https://a.example/x.jpg", "mime_type": "image/jpeg"}


def _add(**changes: object) -> Call:
    data = {k: v for k, v in (OK | changes).items() if v is not None}
    return lambda svc, ids: svc.add_image(P, data)


def _reorder(pick: Callable[[list[int]], list[int]]) -> Call:
    return lambda svc, ids: svc.reorder_images(P, pick(ids))


CASES: dict[str, tuple[Call, type[ImageServiceError], str]] = {
    "unknown product": (lambda svc, ids: svc.add_image(999_999, OK), ProductNotFoundError, "999"),
    "unknown image": (lambda svc, ids: svc.delete_image(987_654), ImageNotFoundError, "987654"),
    "unknown fallback image": (lambda svc, ids: svc.delete_image(-1), ImageNotFoundError, "-1"),
    "product id past bigint": (
        lambda svc, ids: svc.list_images(2**70),
        ProductNotFoundError,
        "not found",
    ),
    "image id past bigint": (
        lambda svc, ids: svc.delete_image(2**70),
        ImageNotFoundError,
        "not found",
    ),
    "image id below bigint": (
        lambda svc, ids: svc.delete_image(-(2**70)),
        ImageNotFoundError,
        "not found",
    ),
    "width past integer": (_add(width=2**31), InvalidImageError, "width"),
    "reorder missing one": (_reorder(lambda ids: ids[:-1]), NotAPermutationError, "permutation"),
    "reorder duplicate": (
        _reorder(lambda ids: [ids[0], *ids[:-1]]),
        NotAPermutationError,
        "permutation",
    ),
    "reorder foreign id": (
        _reorder(lambda ids: [*ids[:-1], 123_456]),
        NotAPermutationError,
        "permutation",
    ),
    "second label": (
        lambda svc, ids: svc.set_label_flag(ids[1], True),
        LabelConflictError,
        "already has a label",
    ),
    "label added as a second label": (_add(is_label=True), LabelConflictError, "already has"),
    "javascript url": (_add(url="javascript:alert(1)"), InvalidImageError, "https"),
    "http url": (_add(url="http://a.example/x.jpg"), InvalidImageError, "https"),
    "data url": (_add(url="data:image/png;base64,AAAA"), InvalidImageError, "https"),
    "url without host": (_add(url="https:///x.jpg"), InvalidImageError, "host"),
    "oversized file": (_add(file_size=10**9), InvalidImageError, "file_size"),
    "unknown mime type": (_add(mime_type="image/svg+xml"), InvalidImageError, "mime_type"),
    "missing mime type": (_add(mime_type=None), InvalidImageError, "mime_type"),
    "unknown field": (_add(x=1), InvalidImageError, "unknown field"),
    "boolean width": (_add(width=True), InvalidImageError, "width"),
    "photo limit": (_add(), PhotoLimitError, "maximum"),
}


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_typed_and_writes_nothing(
    conn: PG, migrated_url: str, stage: Stage, case: str
) -> None:
    """Each bad call raises its typed error and leaves both JSONB and the table as they were."""
    call, error, text = CASES[case]
    bring_to(conn, T, stage)
    with engine_for(migrated_url) as engine:
        with service(engine, T) as svc:
            ids = [v.id for v in svc.list_images(P)]
            svc.set_label_flag(ids[0], True)
        before = snapshot(conn, T, P)
        limit = len(ids) - 1 if case == "photo limit" else 20
        settings = ServiceSettings(max_photos=limit)
        with pytest.raises(error, match=text), service(engine, T, settings) as svc:
            call(svc, [v.id for v in svc.list_images(P)])
    assert snapshot(conn, T, P) == before


def test_images_that_are_not_an_array_are_never_overwritten(conn: PG, migrated_url: str) -> None:
    """A non-array images value reads as empty and is never overwritten by an edit."""
    conn.execute(
        tq("UPDATE {products} SET images = %s WHERE id = %s", T),
        ('{"0": {"url": "https://a.example/kept.jpg"}}', P),
    )
    before = snapshot(conn, T, P)
    with engine_for(migrated_url) as engine:
        with service(engine, T) as svc:
            assert svc.list_images(P) == []
        with pytest.raises(MalformedImagesError, match="object"), service(engine, T) as svc:
            svc.add_image(P, OK)
    assert snapshot(conn, T, P) == before
