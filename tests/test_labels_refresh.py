"""Metadata decisions are re-derived when the images they were made on change.

The case from the demo: a client appends a photo (it lands after the label), the
backfill decides the product in that instant ("no label": the last image is a fresh
jpg), then the client moves the label back to the end. Without a refresh the "no label"
decision stays and the label is published.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from cdc import label_heuristics, reconcile
from cdc.stage import Stage
from services.converters import EbayProductConversionService, VintedProductConverter
from services.image_service import ProductImageService
from tests.cutover_helpers import engine_for, move, service
from tests.label_helpers import Conn, run_backfill

T = "user_1"


def _images(conn: Conn, pid: int) -> list[dict[str, Any]]:
    row = conn.execute(
        sql.SQL("SELECT images FROM {} WHERE id = %s").format(sql.Identifier(T, "products")),
        (pid,),
    ).fetchone()
    assert row is not None
    return sorted(row[0], key=lambda e: e["order"])


def _write(conn: Conn, pid: int, images: list[dict[str, Any]]) -> None:
    for k, element in enumerate(images):
        element["order"] = k
    conn.execute(
        sql.SQL("UPDATE {} SET images = %s::jsonb WHERE id = %s").format(
            sql.Identifier(T, "products")
        ),
        (json.dumps(images), pid),
    )


def _clear_labels(conn: Conn) -> list[tuple[int, str]]:
    """Products whose true label is a png, last, at least an hour after the photo before
    it: the heuristic labels these on its default likelihood ratios."""
    rows = conn.execute(
        "SELECT product_id, url FROM seed_truth.labels WHERE tenant = %s ORDER BY 1", (T,)
    ).fetchall()
    out = []
    for pid, url in rows:
        images = _images(conn, pid)
        if len(images) < 2 or images[-1].get("url") != url or not url.endswith(".png"):
            continue
        stamps = [datetime.fromisoformat(e["created_at"]) for e in images[-2:]]
        if stamps[1] - stamps[0] >= timedelta(hours=1):
            out.append((pid, url))
    return out[:6]


def _append_after_label(conn: Conn, pid: int) -> None:
    """What an appending client does first: the new photo lands after the label."""
    now = datetime.now(UTC).isoformat()
    images = _images(conn, pid)
    _write(
        conn, pid, [*images, {"url": f"https://cdn.example/{T}/live-{pid}.jpg", "created_at": now}]
    )


def _label_last_again(conn: Conn, pid: int, label: str) -> None:
    images = _images(conn, pid)
    _write(
        conn,
        pid,
        [*(e for e in images if e["url"] != label), *(e for e in images if e["url"] == label)],
    )


def _labelled(conn: Conn, pid: int) -> list[tuple[str, str | None]]:
    query = sql.SQL("SELECT url, label_strategy FROM {} WHERE product_id = %s AND is_label").format(
        sql.Identifier(T, "product_images")
    )
    return [(r[0], r[1]) for r in conn.execute(query, (pid,)).fetchall()]


def _versions(conn: Conn) -> dict[int, str]:
    query = sql.SQL("SELECT id, xmin::text FROM {}").format(sql.Identifier(T, "product_images"))
    return {int(r[0]): str(r[1]) for r in conn.execute(query).fetchall()}


def _stranded(url: str, *, label_last_again: bool = True) -> list[tuple[int, str]]:
    """Labels decided "no label" because a photo had just been appended after them; the
    legacy app then moves them last again (unless told not to)."""
    with psycopg.connect(url, autocommit=True) as conn:
        chosen = _clear_labels(conn)
        assert len(chosen) >= 3
        for pid, _ in chosen:
            _append_after_label(conn, pid)
    run_backfill(url, "metadata")
    with psycopg.connect(url, autocommit=True) as conn:
        for pid, label in chosen:
            assert _labelled(conn, pid) == []  # the premise: decided in the transient state
            if label_last_again:
                _label_last_again(conn, pid, label)
                assert _labelled(conn, pid) == []  # a legacy write does not re-decide inline
    return chosen


def _move_last(svc: ProductImageService, pid: int, url: str) -> None:
    views = svc.list_images(pid)
    at = [v.url for v in views].index(url)
    ids = [v.id for v in views]
    svc.reorder_images(pid, [*ids[:at], *ids[at + 1 :], ids[at]])


def test_reconcile_re_derives_stale_decisions_and_writes_nothing_else(migrated_url: str) -> None:
    """Reconcile re-decides the stranded products; every other row keeps its version."""
    chosen = _stranded(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        others = _versions(conn)
    outcomes = reconcile.run(migrated_url, [T], mode="reconcile")
    assert [o.exit_code for o in outcomes] == [0]
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        for pid, label in chosen:
            assert _labelled(conn, pid) == [(label, "metadata")]
        touched = {i for i, v in _versions(conn).items() if others.get(i) != v}
        query = sql.SQL("SELECT id FROM {} WHERE product_id = ANY (%s)").format(
            sql.Identifier(T, "product_images")
        )
        allowed = {int(r[0]) for r in conn.execute(query, ([p for p, _ in chosen],))}
        assert touched
        assert touched <= allowed
        # A second pass has nothing left to change, and locks no product to find that out.
        locks = sql.SQL("SELECT id, xmax::text FROM {}").format(sql.Identifier(T, "products"))
        before = conn.execute(locks).fetchall()
        assert label_heuristics.refresh_tenant(conn, T) == 0
        assert conn.execute(locks).fetchall() == before


def test_service_reorder_re_derives_at_once_and_append_keeps_the_label(migrated_url: str) -> None:
    """Through the service, in the edit's own transaction: moving the label last labels it;
    appending a photo after a decided label does not unmake it."""
    (stale, label), (kept, kept_label), *_ = _stranded(migrated_url, label_last_again=False)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        assert label_heuristics.refresh_tenant(conn, T) == 0  # nothing changed since
    with engine_for(migrated_url) as engine:
        with service(engine, T) as svc:
            assert svc.stage() is Stage.DUAL_WRITE
            _move_last(svc, stale, label)
            _move_last(svc, kept, kept_label)
        with psycopg.connect(migrated_url, autocommit=True) as conn:
            assert _labelled(conn, stale) == [(label, "metadata")]
            assert _labelled(conn, kept) == [(kept_label, "metadata")]
        with service(engine, T) as svc:
            svc.add_image(
                kept, {"url": f"https://cdn.example/{T}/after.jpg", "mime_type": "image/jpeg"}
            )
            assert svc.list_images(kept)[-1].url.endswith("after.jpg")
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        assert _labelled(conn, kept) == [(kept_label, "metadata")]


def test_other_deciders_are_final(migrated_url: str) -> None:
    """A review decision is not re-derived, even when the heuristic would now say otherwise."""
    chosen = _stranded(migrated_url)
    pid, _ = chosen[0]
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "UPDATE {} SET label_strategy = 'review', label_confidence = 1"
                " WHERE product_id = %s"
            ).format(sql.Identifier(T, "product_images")),
            (pid,),
        )
        before = _versions(conn)
        changed = label_heuristics.refresh_tenant(conn, T)
        assert changed == len(chosen) - 1
        assert _labelled(conn, pid) == []
        query = sql.SQL("SELECT id FROM {} WHERE product_id = %s").format(
            sql.Identifier(T, "product_images")
        )
        for (image_id,) in conn.execute(query, (pid,)).fetchall():
            assert _versions(conn)[image_id] == before[image_id]


def test_converters_re_derive_before_publishing(migrated_url: str) -> None:
    """A legacy write moved the label last after the decision and no reconcile ran since:
    neither marketplace payload carries it, and the new decision is stored."""
    chosen = _stranded(migrated_url)
    with engine_for(migrated_url) as engine:
        for pid, label in chosen:
            with service(engine, T) as svc:
                vinted = VintedProductConverter(svc).convert(pid).payload
                ebay = EbayProductConversionService(svc).convert(pid).payload
            published = {p["url"] for p in vinted["photos"]}
            assert published == set(ebay["body"]["product"]["imageUrls"])
            assert published
            assert label not in published
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        for pid, label in chosen:
            assert _labelled(conn, pid) == [(label, "metadata")]
        # Publishing a product whose decision stands takes no lock and writes nothing.
        steady = next(p for p in range(1, 200) if p not in dict(chosen))
        xmax = sql.SQL("SELECT xmax::text FROM {} WHERE id = %s").format(
            sql.Identifier(T, "products")
        )
        before = conn.execute(xmax, (steady,)).fetchall()
        rows_before = _versions(conn)
    with engine_for(migrated_url) as engine, service(engine, T) as svc:
        assert VintedProductConverter(svc).convert(steady).payload["photos"]
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        assert conn.execute(xmax, (steady,)).fetchall() == before
        assert _versions(conn) == rows_before


def test_refresh_in_stage_table_reaches_the_jsonb_and_leaves_no_drift(migrated_url: str) -> None:
    """In `table` the refreshed label is synced back to JSONB by the reverse trigger, so
    old app instances see it too, and verify finds the product in sync."""
    (pid, label), *_ = _stranded(migrated_url, label_last_again=False)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        move(conn, T, Stage.TABLE)
    with engine_for(migrated_url) as engine, service(engine, T) as svc:
        assert svc.stage() is Stage.TABLE
        _move_last(svc, pid, label)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        assert _labelled(conn, pid) == [(label, "metadata")]
        flagged = [e["url"] for e in _images(conn, pid) if e.get("is_label") is True]
        assert flagged == [label]
    # Other products' backfill labels reach the JSONB at the first reconcile in `table`
    # (the forced move skipped it); the refreshed product is already in sync.
    (outcome,) = reconcile.run(migrated_url, [T], mode="verify")
    assert outcome.report.products_checked > 0
    assert pid not in outcome.report.drifted
