"""Vinted and eBay payloads: never a label, every true photo in order."""

from __future__ import annotations

from decimal import Decimal

import psycopg
import pytest
from psycopg import sql

from cdc.stage import Stage
from services.converters import (
    EbayProductConversionService,
    ProductInfo,
    VintedProductConverter,
    ebay_inventory_item,
    load_product,
    vinted_item,
)
from services.image_types import LABEL_COPY, ImageView
from tests.cutover_helpers import PG, bring_to, engine_for, mark_true_labels, move, service

TENANTS = ("user_1", "user_2", "user_4", "user_5")
PRODUCT = ProductInfo(id=1, sku="SKU-1", title="x" * 100, brand=None, price=Decimal("12.5"))


def _photos(n: int, *, label_at: int | None = None, scheme: str = "https") -> list[ImageView]:
    return [
        ImageView(id=i + 1, product_id=1, url=f"{scheme}://cdn.example/{i}.jpg", order=i,
                  is_label=i == label_at)
        for i in range(n)
    ]  # fmt: skip


def test_vinted_keeps_order_drops_labels_and_caps_at_20() -> None:
    """25 images with a label: 20 photos in order, no label, the rest reported."""
    photos = _photos(25, label_at=3)
    result = vinted_item(PRODUCT, list(reversed(photos)))
    urls = [p["url"] for p in result.payload["photos"]]
    expected = [p.url for p in photos if not p.is_label]
    assert urls == expected[:20]
    assert [p["position"] for p in result.payload["photos"]] == list(range(20))
    assert [u for u, _ in result.skipped] == expected[20:]
    assert result.payload["price"] == {"amount": "12.50", "currency_code": "EUR"}


def test_ebay_is_https_only_drops_labels_and_caps_at_24() -> None:
    """http photos and labels never reach imageUrls; at most 24; title cut to 80."""
    photos = [*_photos(2, scheme="http"), *_photos(30, label_at=0)[2:]]
    photos.append(ImageView(id=99, product_id=1, url="https://cdn.example/label.png", order=40,
                            is_label=True))  # fmt: skip
    result = ebay_inventory_item(PRODUCT, photos)
    product = result.payload["body"]["product"]
    assert product["imageUrls"] == [p.url for p in photos[2:26]]
    assert "https://cdn.example/label.png" not in product["imageUrls"]
    assert len(product["title"]) == 80
    assert "brand" not in product
    assert {why for _, why in result.skipped} == {
        "eBay accepts https image URLs only",
        "eBay takes at most 24 images",
    }


def test_a_copy_of_the_label_is_never_published() -> None:
    """The label's url again among the photos (one row only can be flagged): the copy is
    the same price tag, so both payloads leave it out and report it as skipped."""
    photos = _photos(4, label_at=1)
    copy = ImageView(id=9, product_id=1, url=photos[1].url, order=4)
    for result in (
        vinted_item(PRODUCT, [*photos, copy]),
        ebay_inventory_item(PRODUCT, [*photos, copy]),
    ):
        published = result.payload.get("photos") or result.payload["body"]["product"]["imageUrls"]
        urls = [p["url"] if isinstance(p, dict) else p for p in published]
        assert urls == [photos[0].url, photos[2].url, photos[3].url], result.marketplace
        assert result.skipped == ((copy.url, LABEL_COPY),), result.marketplace


def _truth(conn: PG, tenant: str) -> dict[int, tuple[list[str], str | None]]:
    """Per product: its images in canonical order, and its true label url (tests only)."""
    query = sql.SQL(
        'SELECT p.id, (SELECT array_agg(m.url ORDER BY m."order") '
        "FROM imgmig.images_to_rows(p.images) m), t.url FROM {} p "
        "LEFT JOIN seed_truth.labels t ON t.tenant = %s AND t.product_id = p.id"
    ).format(sql.Identifier(tenant, "products"))
    rows = conn.execute(query, (tenant,)).fetchall()
    return {int(r[0]): (list(r[1]), r[2]) for r in rows}


def _true_photos(images: list[str], label: str | None) -> list[str]:
    """What may be published: every image but the label, and but any copy of its url."""
    if label is None:
        return images
    assert images[-1] == label
    return [url for url in images if url != label]


def test_whole_seed_at_stage_table_has_no_label_and_every_photo(
    conn: PG, migrated_url: str
) -> None:
    """At stage table, no payload has a label and each has every true photo in order."""
    checked = labelled = 0
    with engine_for(migrated_url) as engine:
        for tenant in TENANTS:
            bring_to(conn, tenant, Stage.TABLE)
            marked = mark_true_labels(conn, tenant)
            truth = _truth(conn, tenant)
            assert marked == sum(1 for _, label in truth.values() if label)
            with service(engine, tenant) as svc:
                vinted, ebay = VintedProductConverter(svc), EbayProductConversionService(svc)
                for product_id, (images, label) in truth.items():
                    photos = _true_photos(images, label)
                    v = [p["url"] for p in vinted.convert(product_id).payload["photos"]]
                    e = ebay.convert(product_id).payload["body"]["product"]["imageUrls"]
                    assert v == photos[:20]
                    assert e == [u for u in photos if u.startswith("https://")][:24]
                    if label is not None:
                        assert label not in v
                        assert label not in e
                        labelled += 1
                    checked += 1
    assert checked == 300
    assert labelled == 60


def test_converters_follow_the_flag_in_a_jsonb_stage(conn: PG, migrated_url: str) -> None:
    """In a JSONB stage, table-only and JSONB-set labels are both left out."""
    tenant = "user_1"
    bring_to(conn, tenant, Stage.DUAL_WRITE)
    mark_true_labels(conn, tenant)
    truth = _truth(conn, tenant)
    product_id = next(p for p, (_, label) in truth.items() if label)
    images, label = truth[product_id]
    with engine_for(migrated_url) as engine:
        with service(engine, tenant) as svc:
            urls = [
                p["url"] for p in VintedProductConverter(svc).convert(product_id).payload["photos"]
            ]
            assert urls == _true_photos(images, label)
            first = svc.list_images(product_id)[0]
            svc.set_label_flag(svc.get_label_image(product_id).id, False)  # type: ignore[union-attr]
            svc.set_label_flag(first.id, True)
        move(conn, tenant, Stage.TABLE)
        move(conn, tenant, Stage.DUAL_WRITE)
        with service(engine, tenant) as svc:
            result = EbayProductConversionService(svc).convert(product_id)
    assert first.url not in result.payload["body"]["product"]["imageUrls"]


def test_the_product_is_read_under_the_stage_lock(conn: PG, migrated_url: str) -> None:
    """A conversion locks the stage row before it reads ``products``, as every service read
    does: a stage change (the contract, say) takes the table locks after the stage row's,
    and the other order could deadlock."""
    bring_to(conn, "user_1", Stage.TABLE)
    with engine_for(migrated_url) as engine, service(engine, "user_1") as svc:
        load_product(svc, 1)
        with psycopg.connect(migrated_url) as other:
            other.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute(
                    "SELECT 1 FROM imgmig.tenant_state WHERE tenant = 'user_1' FOR UPDATE"
                )
