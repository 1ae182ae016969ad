"""The kill switch while services write: no write is lost, both sides stay in sync."""

from __future__ import annotations

import threading
import time

from cdc import cutover
from cdc import stage as stage_mod
from cdc.stage import Stage
from services.image_types import ServiceSettings
from tests.cutover_helpers import PG, bring_to, engine_for, out_of_sync, service, tq

T = "user_1"
PRODUCTS = (1, 2, 3)
SETTINGS = ServiceSettings(max_photos=1000)


def _writer(
    url: str, product_id: int, stop: threading.Event, done: list[str], errors: list[BaseException]
) -> None:
    with engine_for(url) as engine:
        n = 0
        while not stop.is_set() and n < 60:
            new = f"https://cdn.example/{product_id}/traffic-{n}.jpg"
            try:
                with service(engine, T, SETTINGS) as svc:
                    added = svc.add_image(product_id, {"url": new, "mime_type": "image/jpeg"})
                    svc.delete_image(added.id)
                    svc.add_image(product_id, {"url": new, "mime_type": "image/jpeg"})
            except BaseException as exc:
                errors.append(exc)
                return
            done.append(new)
            n += 1


def test_kill_switch_under_concurrent_service_writes(conn: PG, migrated_url: str) -> None:
    """Under concurrent writes the kill switch loses nothing; JSONB and table agree."""
    bring_to(conn, T, Stage.TABLE)
    stop = threading.Event()
    done: list[str] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_writer, args=(migrated_url, p, stop, done, errors))
        for p in PRODUCTS
    ]
    for thread in threads:
        thread.start()
    while len(done) < 15 and not errors:
        time.sleep(0.01)
    before = len(done)
    cutover.kill_switch(conn, reason="drill under traffic", actor="tests")
    while len(done) < before + 15 and not errors:
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stage_mod.get(conn, T).stage is Stage.DUAL_WRITE
    urls = {
        url
        for (images,) in conn.execute(
            tq("SELECT images FROM {products} WHERE id = ANY(%s)", T), (list(PRODUCTS),)
        )
        for url in (e["url"] for e in images)
    }
    assert set(done) <= urls
    assert out_of_sync(conn, T) == []


def _read_then_write(
    url: str, product_id: int, stop: threading.Event, errors: list[BaseException]
) -> None:
    with engine_for(url) as engine:
        n = 0
        while not stop.is_set() and n < 200:
            try:
                with service(engine, T, SETTINGS) as svc:
                    svc.list_images(product_id)
                    svc.add_image(
                        product_id,
                        {"url": f"https://cdn.example/rw-{n}.jpg", "mime_type": "image/jpeg"},
                    )
            except BaseException as exc:
                errors.append(exc)
                return
            n += 1


def test_kill_switch_with_read_then_write_transactions(conn: PG, migrated_url: str) -> None:
    """Transactions that read then write never make the kill switch give up on a tenant."""
    bring_to(conn, T, Stage.TABLE)
    stop = threading.Event()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_read_then_write, args=(migrated_url, p, stop, errors))
        for p in PRODUCTS
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    moves = cutover.kill_switch(conn, reason="drill", actor="tests")
    stop.set()
    for thread in threads:
        thread.join()
    assert [m.error for m in moves] == [None] * len(moves)
    assert errors == []
    assert stage_mod.get(conn, T).stage is Stage.DUAL_WRITE
