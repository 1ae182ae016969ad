"""Shadow reads, fallback ids and concurrent edits of one product."""

from __future__ import annotations

import threading

import pytest
from structlog.testing import capture_logs

from cdc.stage import Stage
from services.image_types import ServiceSettings, product_of_fallback
from tests.cutover_helpers import PG, bring_to, engine_for, out_of_sync, service, tq

T = "user_1"


def test_shadow_read_serves_jsonb_and_logs_and_counts_a_mismatch(
    conn: PG, migrated_url: str
) -> None:
    """A shadow mismatch: JSONB served; the difference logged, counted and kept."""
    bring_to(conn, T, Stage.SHADOW_READ)
    gone = conn.execute(
        tq('DELETE FROM {images} WHERE product_id = 6 AND "order" = 0 RETURNING url', T)
    ).fetchone()
    assert gone is not None
    with engine_for(migrated_url) as engine, capture_logs() as logs:
        with service(engine, T) as svc:
            served = svc.list_images(6)
        with service(engine, T) as svc:
            svc.list_images(7)
    assert served[0].url == gone[0]
    (event,) = [e for e in logs if e["event"] == "shadow mismatch"]
    assert event["product_id"] == 6
    assert event["diff"] == {"missing_in_table": [gone[0]]}
    stats = conn.execute(
        "SELECT reads, mismatches FROM imgmig.shadow_stats WHERE tenant = %s", (T,)
    ).fetchone()
    assert stats == (2, 1)
    kept = conn.execute("SELECT product_id, diff FROM imgmig.shadow_mismatches").fetchall()
    assert kept == [(6, {"missing_in_table": [gone[0]]})]


def test_shadow_read_notices_a_label_the_table_disagrees_with(conn: PG, migrated_url: str) -> None:
    """A label stated in JSONB but not in the table is a field mismatch."""
    bring_to(conn, T, Stage.SHADOW_READ)
    with engine_for(migrated_url) as engine:
        with service(engine, T) as svc:
            first = svc.list_images(8)[0]
            svc.set_label_flag(first.id, True)
        conn.execute(tq("UPDATE {images} SET is_label = false WHERE product_id = 8", T))
        with capture_logs() as logs, service(engine, T) as svc:
            svc.get_product_photos(8)
    (event,) = [e for e in logs if e["event"] == "shadow mismatch"]
    assert event["diff"]["fields"][0]["field"] == "is_label"


def test_fallback_ids_are_stable_without_table_rows(conn: PG, migrated_url: str) -> None:
    """Without table rows, ids are negative, encode the product and survive a reorder."""
    with engine_for(migrated_url) as engine:
        with service(engine, T) as svc:
            views = svc.list_images(10)
        assert all(v.id < 0 and product_of_fallback(v.id) == 10 for v in views)
        with service(engine, T) as svc:
            svc.reorder_images(10, [v.id for v in reversed(views)])
        with service(engine, T) as svc:
            again = svc.list_images(10)
            assert sorted(v.id for v in again) == sorted(v.id for v in views)
            svc.delete_image(views[0].id)
            assert [v.url for v in svc.list_images(10)] == [v.url for v in reversed(views[1:])]


@pytest.mark.parametrize("stage", [Stage.JSONB, Stage.DUAL_WRITE, Stage.TABLE], ids=str)
def test_concurrent_edits_of_one_product_serialise(
    conn: PG, migrated_url: str, stage: Stage
) -> None:
    """Four writers adding to one product at once: nothing lost, orders stay 0..n-1."""
    bring_to(conn, T, stage)
    settings = ServiceSettings(max_photos=100)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        with engine_for(migrated_url) as engine:
            for i in range(5):
                try:
                    with service(engine, T, settings) as svc:
                        url = f"https://cdn.example/w{n}-{i}.jpg"
                        svc.add_image(11, {"url": url, "mime_type": "image/jpeg"})
                except BaseException as exc:
                    errors.append(exc)

    with engine_for(migrated_url) as engine, service(engine, T) as svc:
        start = len(svc.list_images(11))
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine_for(migrated_url) as engine, service(engine, T) as svc:
        views = svc.list_images(11)
    assert len(views) == start + 20
    assert [v.order for v in views] == list(range(start + 20))
    if stage is not Stage.JSONB:
        assert out_of_sync(conn, T) == []


def test_a_fallback_id_still_finds_its_image_once_the_row_exists(
    conn: PG, migrated_url: str
) -> None:
    """A fallback id handed out at stage jsonb still works once the image has a row."""
    with engine_for(migrated_url) as engine:
        with service(engine, T) as svc:
            old = svc.list_images(13)
        bring_to(conn, T, Stage.TABLE)
        with service(engine, T) as svc:
            assert svc.find_image(old[0].id).id > 0
            assert svc.set_label_flag(old[1].id, True).url == old[1].url
            svc.reorder_images(13, [v.id for v in reversed(old)])
            svc.delete_image(old[0].id)
            assert [v.url for v in svc.list_images(13)] == [v.url for v in reversed(old[1:])]
    assert out_of_sync(conn, T) == []


def test_a_failing_shadow_read_never_fails_the_served_read(conn: PG, migrated_url: str) -> None:
    """A failing shadow read is logged and never fails the served read or the transaction."""
    bring_to(conn, T, Stage.SHADOW_READ)
    conn.execute("ALTER TABLE imgmig.shadow_stats RENAME TO shadow_stats_away")
    with engine_for(migrated_url) as engine, capture_logs() as logs:
        with service(engine, T) as svc:
            served = svc.list_images(14)
            svc.add_image(14, {"url": "https://cdn.example/after.jpg", "mime_type": "image/jpeg"})
        with service(engine, T) as svc:
            assert len(svc.list_images(14)) == len(served) + 1
    assert served
    assert any(e["event"] == "shadow read failed" for e in logs)


def test_shadow_counter_never_deadlocks_read_then_write_against_write_then_read(
    conn: PG, migrated_url: str
) -> None:
    """In shadow_read, read-then-write and write-then-read transactions never deadlock."""
    bring_to(conn, T, Stage.SHADOW_READ)
    settings = ServiceSettings(max_photos=100)
    errors: list[BaseException] = []

    def worker(read_first: bool) -> None:
        with engine_for(migrated_url) as engine:
            for i in range(15):
                url = f"https://cdn.example/{read_first}-{i}.jpg"
                try:
                    with service(engine, T, settings) as svc:
                        if read_first:
                            svc.list_images(15)
                        svc.add_image(15, {"url": url, "mime_type": "image/jpeg"})
                        if not read_first:
                            svc.list_images(16)
                except BaseException as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, args=(flag,)) for flag in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine_for(migrated_url) as engine, service(engine, T) as svc:
        urls = {v.url for v in svc.list_images(15)}
    assert {f"https://cdn.example/{f}-{i}.jpg" for f in (True, False) for i in range(15)} <= urls
