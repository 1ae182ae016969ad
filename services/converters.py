"""Marketplace payloads for a product: Vinted items and eBay inventory items.

The payload builders are pure functions from typed values (``ProductInfo`` and the
photos as ``ImageView``) to JSON-ready dicts, testable without a database. The two
classes wrap them for the application: they read the product and its photos through
``ProductImageService``, so they follow the stage flag, and the service already leaves
the label out, after re-deriving a heuristic label decision on the images as they are
now. The builders drop labels again anyway: a label must never be published.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, select

from cdc.errors import ProductNotFoundError
from services.image_service import ProductImageService
from services.image_types import LABEL_COPY, ImageView, label_copies, without_labels
from services.models import Product

VINTED_MAX_PHOTOS = 20
EBAY_MAX_IMAGES = 24
EBAY_MAX_TITLE = 80
CURRENCY = "EUR"


@dataclass(frozen=True, kw_only=True)
class ProductInfo:
    """What the payloads need from a product row."""

    id: int
    sku: str
    title: str
    brand: str | None = None
    price: Decimal | None = None


@dataclass(frozen=True, kw_only=True)
class Conversion:
    """A payload, and the photos that could not go into it, with why."""

    marketplace: str
    payload: dict[str, Any]
    skipped: tuple[tuple[str, str], ...] = ()


def _publishable(photos: Sequence[ImageView]) -> list[ImageView]:
    """The photos in order, without the label or a copy of its url."""
    return sorted(without_labels(photos), key=lambda p: p.order)


def _copies(photos: Sequence[ImageView]) -> list[tuple[str, str]]:
    """The label's copies, reported as skipped (the flagged label itself is not a photo)."""
    return [(p.url, LABEL_COPY) for p in sorted(label_copies(photos), key=lambda p: p.order)]


def vinted_item(product: ProductInfo, photos: Sequence[ImageView]) -> Conversion:
    """A Vinted item payload. Shape::

        {
          "external_id": "SKU-1-0000042",        # our SKU, to find the item again
          "title": "Item 42",
          "description": "Item 42",              # no description column yet: the title
          "brand": "Zara" | null,
          "price": {"amount": "12.50", "currency_code": "EUR"} | null,
          "photos": [{"url": "https://…", "position": 0}, …]   # in order, at most 20
        }

    Labels are never included, nor a copy of the label's url; copies and photos past
    the 20th are skipped and reported.
    """
    ordered = _publishable(photos)
    kept, extra = ordered[:VINTED_MAX_PHOTOS], ordered[VINTED_MAX_PHOTOS:]
    price = None
    if product.price is not None:
        price = {"amount": f"{product.price:.2f}", "currency_code": CURRENCY}
    payload = {
        "external_id": product.sku,
        "title": product.title,
        "description": product.title,
        "brand": product.brand,
        "price": price,
        "photos": [{"url": p.url, "position": i} for i, p in enumerate(kept)],
    }
    skipped = (
        *_copies(photos),
        *((p.url, f"Vinted takes at most {VINTED_MAX_PHOTOS} photos") for p in extra),
    )
    return Conversion(marketplace="vinted", payload=payload, skipped=skipped)


def ebay_inventory_item(product: ProductInfo, photos: Sequence[ImageView]) -> Conversion:
    """An eBay Inventory API inventory item, the body of
    ``PUT /sell/inventory/v1/inventory_item/{sku}`` (createOrReplaceInventoryItem)::

        {
          "sku": "SKU-1-0000042",                 # goes in the path, kept here for callers
          "body": {
            "availability": {"shipToLocationAvailability": {"quantity": 1}},
            "condition": "USED_EXCELLENT",
            "product": {
              "title": "Item 42",                 # at most 80 characters
              "brand": "Zara",                    # omitted when unknown
              "imageUrls": ["https://…", …]       # https only, in order, at most 24
            }
          }
        }

    Labels are never included, nor a copy of the label's url; copies, non-https photos
    and photos past the 24th are skipped and reported.
    """
    skipped: list[tuple[str, str]] = _copies(photos)
    urls: list[str] = []
    for photo in _publishable(photos):
        if not photo.url.lower().startswith("https://"):
            skipped.append((photo.url, "eBay accepts https image URLs only"))
        elif len(urls) >= EBAY_MAX_IMAGES:
            skipped.append((photo.url, f"eBay takes at most {EBAY_MAX_IMAGES} images"))
        else:
            urls.append(photo.url)
    item: dict[str, Any] = {"title": product.title[:EBAY_MAX_TITLE], "imageUrls": urls}
    if product.brand:
        item["brand"] = product.brand
    body = {
        "availability": {"shipToLocationAvailability": {"quantity": 1}},
        "condition": "USED_EXCELLENT",
        "product": item,
    }
    return Conversion(
        marketplace="ebay", payload={"sku": product.sku, "body": body}, skipped=tuple(skipped)
    )


def load_product(service: ProductImageService, product_id: int) -> ProductInfo:
    """The product's own fields (never the JSONB column, which may be gone).

    The stage row is locked first, as for every service read: a stage change takes the
    tenant's table locks after the stage row's, so reading ``products`` before it could
    deadlock with, say, the contract.
    """
    service.stage()
    products = cast(Table, Product.__table__)
    row = service.session.execute(
        select(products.c.id, products.c.sku, products.c.title, products.c.brand, products.c.price)
        .where(products.c.id == product_id)
    ).first()  # fmt: skip
    if row is None:
        raise ProductNotFoundError(tenant=service.tenant, product_id=product_id)
    return ProductInfo(id=row.id, sku=row.sku, title=row.title, brand=row.brand, price=row.price)


def photos_to_publish(service: ProductImageService, product_id: int) -> list[ImageView]:
    """The photos, after the product's heuristic label decision is re-derived on its
    images as they are now: a legacy write since the last reconcile cannot put a label
    into a payload (docs/labels.md)."""
    service.refresh_label(product_id)
    return service.get_product_photos(product_id)


class VintedProductConverter:
    """Builds a product's Vinted item from what the image service serves."""

    def __init__(self, service: ProductImageService) -> None:
        self.service = service

    def convert(self, product_id: int) -> Conversion:
        product = load_product(self.service, product_id)
        return vinted_item(product, photos_to_publish(self.service, product_id))


class EbayProductConversionService:
    """Builds a product's eBay inventory item from what the image service serves."""

    def __init__(self, service: ProductImageService) -> None:
        self.service = service

    def convert(self, product_id: int) -> Conversion:
        product = load_product(self.service, product_id)
        return ebay_inventory_item(product, photos_to_publish(self.service, product_id))
