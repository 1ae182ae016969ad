"""ProductImageService in every stage: the same calls, the stage's truth written, the
other side synced by the triggers, and changes that survive moving forward and back."""

from __future__ import annotations

import contextlib

import pytest
from psycopg.types.json import Jsonb
from sqlalchemy import Engine

from cdc import cutover
from cdc.errors import StageChangedError
from cdc.stage import Stage
from services.image_types import ImageView
from tests.cutover_helpers import (
    PG,
    SYNCED,
    backfill,
    bring_to,
    connect,
    engine_for,
    move,
    out_of_sync,
    service,
    tq,
)

T = "user_2"
STAGES = (Stage.JSONB, Stage.DUAL_WRITE, Stage.SHADOW_READ, Stage.TABLE)
JPEG = "image/jpeg"
EXTENDED = ("is_label", "alt_text", "tags", "mime_type", "file_size", "width", "height")


def _images(engine: Engine, product_id: int) -> list[ImageView]:
    with service(engine, T) as svc:
        return svc.list_images(product_id)


def _jsonb_urls(conn: PG, product_id: int) -> list[str]:
    row = conn.execute(
        tq("SELECT images FROM {products} WHERE id = %s", T), (product_id,)
    ).fetchone()
    assert row is not None
    return [e["url"] for e in sorted(row[0], key=lambda e: e["order"])]


def _jsonb_element(conn: PG, product_id: int, url: str) -> dict[str, object]:
    row = conn.execute(tq("SELECT images FROM {products} WHERE id = %s", T), (product_id,))
    found = row.fetchone()
    assert found is not None
    (element,) = [e for e in found[0] if e["url"] == url]
    return dict(element)


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
def test_every_operation_in_each_stage(conn: PG, migrated_url: str, stage: Stage) -> None:
    """Every operation gives the same results in each stage; JSONB holds the extended keys."""
    bring_to(conn, T, stage)
    with engine_for(migrated_url) as engine:
        start = [v.url for v in _images(engine, 5)]
        with service(engine, T) as svc:
            added = svc.add_image(5, {"url": "https://cdn.example/new.jpg", "mime_type": JPEG,
                                      "file_size": 1234, "width": 800, "height": 600,
                                      "alt_text": "front", "tags": ["front"]})  # fmt: skip
        assert added.url == "https://cdn.example/new.jpg"
        assert (added.mime_type, added.file_size, added.alt_text) == (JPEG, 1234, "front")
        with service(engine, T) as svc:
            label = svc.set_label_flag(added.id, True)
            assert label.is_label
            assert svc.get_label_image(5) == label
            assert [p.url for p in svc.get_product_photos(5)] == start
        element = _jsonb_element(conn, 5, "https://cdn.example/new.jpg")
        assert {k: element[k] for k in EXTENDED} == {
            "is_label": True, "alt_text": "front", "tags": ["front"], "mime_type": JPEG,
            "file_size": 1234, "width": 800, "height": 600,
        }  # fmt: skip
        ids = [v.id for v in _images(engine, 5)]
        with service(engine, T) as svc:
            svc.reorder_images(5, list(reversed(ids)))
        assert [v.url for v in _images(engine, 5)] == ["https://cdn.example/new.jpg", *start[::-1]]
        with service(engine, T) as svc:
            svc.delete_image(_images(engine, 5)[1].id)
            photos = svc.get_product_photos(5)
        assert [p.url for p in photos] == start[::-1][1:]
        final = _images(engine, 5)
        assert [v.order for v in final] == list(range(len(final)))
    assert _jsonb_urls(conn, 5) == [v.url for v in final]
    if stage in SYNCED:
        assert out_of_sync(conn, T) == []


def test_changes_survive_moving_forward_and_rolling_back(conn: PG, migrated_url: str) -> None:
    """A change made in each stage is still right after every later move, back and forth."""
    expected: list[str] = []
    label: list[str] = []

    def check() -> None:
        views = _images(engine, 9)
        assert [v.url for v in views] == expected
        assert [v.url for v in views if v.is_label] == label
        assert _jsonb_urls(conn, 9) == expected

    with engine_for(migrated_url) as engine:
        expected[:] = [v.url for v in _images(engine, 9)]

        def add(name: str) -> ImageView:
            with service(engine, T) as svc:
                view = svc.add_image(9, {"url": f"https://cdn.example/{name}", "mime_type": JPEG})
            expected.append(view.url)
            return view

        add("jsonb.jpg")
        move(conn, T, Stage.DUAL_WRITE)
        backfill(conn, T)
        check()
        tag = add("dual.jpg")
        with service(engine, T) as svc:
            svc.set_label_flag(_images(engine, 9)[-1].id, True)
        label[:] = [tag.url]
        move(conn, T, Stage.SHADOW_READ)
        check()
        with service(engine, T) as svc:
            ids = [v.id for v in svc.list_images(9)]
            svc.reorder_images(9, [ids[-1], *ids[:-1]])
        expected[:] = [expected[-1], *expected[:-1]]
        move(conn, T, Stage.TABLE)
        check()
        add("table.jpg")
        with service(engine, T) as svc:
            svc.delete_image(_images(engine, 9)[1].id)
        del expected[1]
        move(conn, T, Stage.DUAL_WRITE)  # rollback: one flip
        check()
        add("after-rollback.jpg")
        with service(engine, T) as svc:
            svc.set_label_flag(_images(engine, 9)[0].id, False)
        label[:] = []
        move(conn, T, Stage.TABLE)
        check()
        move(conn, T, Stage.SHADOW_READ)
        check()
    assert out_of_sync(conn, T) == []


def test_contracted_stage_works_without_the_jsonb_column(conn: PG, migrated_url: str) -> None:
    """After the contract drops products.images, every operation still works on the table."""
    bring_to(conn, T, Stage.TABLE)
    move(conn, T, Stage.CONTRACTED)
    conn.execute(tq("ALTER TABLE {products} DROP COLUMN images", T))
    with engine_for(migrated_url) as engine:
        start = [v.url for v in _images(engine, 12)]
        with service(engine, T) as svc:
            added = svc.add_image(12, {"url": "https://cdn.example/c.jpg", "mime_type": JPEG})
            svc.set_label_flag(added.id, True)
            ids = [v.id for v in svc.list_images(12)]
            svc.reorder_images(12, ids[::-1])
            svc.delete_image(ids[0])
        with service(engine, T) as svc:
            assert [p.url for p in svc.get_product_photos(12)] == start[::-1][:-1]
            assert svc.get_label_image(12) == svc.list_images(12)[0]


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
def test_a_copy_of_the_label_is_not_a_photo(conn: PG, migrated_url: str, stage: Stage) -> None:
    """A legacy array that names the label's url twice: one element flagged, one not (the
    table can flag only one row). Both are the label picture; neither is a photo."""
    bring_to(conn, T, stage)
    tag, photo = "https://cdn.example/tag.png", "https://cdn.example/front.jpg"
    images = [{"url": tag, "order": 0, "is_label": True}, {"url": photo, "order": 1},
              {"url": tag, "order": 2}]  # fmt: skip
    conn.execute(tq("UPDATE {products} SET images = %s WHERE id = 7", T), (Jsonb(images),))
    conn.commit()
    with engine_for(migrated_url) as engine, service(engine, T) as svc:
        assert [v.url for v in svc.list_images(7)] == [tag, photo, tag]
        assert [v.url for v in svc.get_product_photos(7)] == [photo]
        label = svc.get_label_image(7)
        assert label is not None
        assert label.url == tag


def test_a_stage_change_let_through_by_a_rolled_back_savepoint_fails_the_transaction(
    conn: PG, migrated_url: str
) -> None:
    """The stage row's lock, taken inside a savepoint the caller rolls back, goes with it:
    the kill switch can then move the tenant. The service notices at its next call and
    refuses to go on with the old stage, so nothing it wrote commits."""
    bring_to(conn, T, Stage.TABLE)
    with engine_for(migrated_url) as engine, service(engine, T) as svc:
        with contextlib.suppress(ZeroDivisionError), svc.session.begin_nested():
            assert svc.stage() is Stage.TABLE
            raise ZeroDivisionError  # the caller's own error: the savepoint rolls back
        with connect(migrated_url) as other:  # not blocked: the lock went with it
            moved = cutover.kill_switch(other, reason="test")
        assert {m.tenant: m.to_stage for m in moved}[T] is Stage.DUAL_WRITE
        with pytest.raises(StageChangedError, match="'table' to 'dual_write'"):
            svc.add_image(1, {"url": "https://cdn.example/after-switch.jpg", "mime_type": JPEG})
        svc.session.rollback()
    kept = conn.execute(
        tq("SELECT count(*) FROM {images} WHERE url LIKE '%/after-switch.jpg'", T)
    ).fetchone()
    assert kept == (0,)
