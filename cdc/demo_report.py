"""The demo's checks, computed from the database and compared with the traffic ledger."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from cdc.db import Conn, connect
from cdc.tenants import TRUTH_SCHEMA
from cdc.traffic import Entry, Key, Ledger, Stats, canonical_urls
from services.converters import (
    EbayProductConversionService,
    ProductInfo,
    VintedProductConverter,
    ebay_inventory_item,
    vinted_item,
)
from services.db import make_engine, tenant_session
from services.image_service import ProductImageService
from services.image_types import ImageView, ServiceSettings

OWNERS = {0: "legacy", 1: "service", 2: "legacy", 3: "api"}


def truth_labels(conn: Conn) -> dict[Key, str]:
    """The seed's label truth: (tenant, product) -> url. Read by the report, never by detection."""
    rows = conn.execute(
        sql.SQL("SELECT tenant, product_id, url FROM {}").format(
            sql.Identifier(TRUTH_SCHEMA, "labels")
        )
    ).fetchall()
    return {(str(r[0]), int(r[1])): str(r[2]) for r in rows}


def initial_ledger(conn: Conn, tenants: list[str]) -> Ledger:
    """Every product's urls as the seed left them, each product given to one writer."""
    truth = truth_labels(conn)
    ledger = Ledger()
    for tenant in tenants:
        rows = conn.execute(
            sql.SQL("SELECT id, images FROM {}").format(sql.Identifier(tenant, "products"))
        ).fetchall()
        for pid, images in rows:
            key = (tenant, int(pid))
            owner = OWNERS[int(pid) % 4]
            ledger.entries[key] = Entry(canonical_urls(images), owner, truth.get(key))
    return ledger


@dataclass
class Comparison:
    """The ledger against what a side of the database holds."""

    expected_images: int = 0
    found_images: int = 0
    lost: int = 0
    duplicate: int = 0
    misordered: int = 0
    ghost_products: int = 0  # products the ledger deleted that still have images
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicate or self.misordered or self.ghost_products)


_TABLE_URLS = sql.SQL(
    'SELECT product_id, array_agg(url ORDER BY "order", id) FROM {} GROUP BY product_id'
)
_JSONB_URLS = sql.SQL("SELECT id, images FROM {}")


def compare(conn: Conn, ledger: Ledger, tenants: list[str], *, side: str) -> Comparison:
    """Lost, duplicate and misordered images of ``side`` ("table" or "jsonb")."""
    result = Comparison()
    for tenant in tenants:
        found = _found(conn, tenant, side)
        for (t, pid), entry in ledger.entries.items():
            if t != tenant:
                continue
            have = found.get(pid, [])
            _compare_one(result, f"{t}/{pid}", entry.urls, have)
        result.ghost_products += sum(
            1 for (t, pid) in ledger.deleted if t == tenant and found.get(pid)
        )
    return result


def _found(conn: Conn, tenant: str, side: str) -> dict[int, list[str]]:
    if side == "table":
        rows = conn.execute(_TABLE_URLS.format(sql.Identifier(tenant, "product_images")))
        return {int(r[0]): list(r[1]) for r in rows}
    rows = conn.execute(_JSONB_URLS.format(sql.Identifier(tenant, "products")))
    return {int(r[0]): canonical_urls(r[1]) for r in rows}


def _compare_one(result: Comparison, name: str, want: list[str], have: list[str]) -> None:
    result.expected_images += len(want)
    result.found_images += len(have)
    missing = Counter(want) - Counter(have)
    extra = Counter(have) - Counter(want)
    result.lost += sum(missing.values())
    result.duplicate += sum(extra.values())
    if not missing and not extra and want != have:
        result.misordered += 1
    if (missing or extra or want != have) and len(result.examples) < 5:
        result.examples.append(f"{name}: expected {want}, found {have}")


@dataclass(frozen=True)
class LabelMetrics:
    true_positive: int
    false_positive: int
    false_negative: int
    #: The first few misses, "tenant/#pid: label L, flagged F (strategy S)", for the report.
    misses: tuple[str, ...] = ()

    @property
    def precision(self) -> float:
        flagged = self.true_positive + self.false_positive
        return self.true_positive / flagged if flagged else 1.0

    @property
    def recall(self) -> float:
        real = self.true_positive + self.false_negative
        return self.true_positive / real if real else 1.0


def label_metrics(conn: Conn, ledger: Ledger, tenants: list[str]) -> LabelMetrics:
    """Flagged labels against the truth, for products the ledger still has."""
    tp = fp = fn = 0
    misses: list[str] = []
    for tenant in tenants:
        rows = conn.execute(
            sql.SQL(
                "SELECT r.product_id, max(r.url) FILTER (WHERE r.is_label), "
                "string_agg(DISTINCT r.label_strategy, ',') FROM {} r GROUP BY r.product_id"
            ).format(sql.Identifier(tenant, "product_images"))
        ).fetchall()
        flagged = {int(r[0]): str(r[1]) for r in rows if r[1] is not None}
        strategy = {int(r[0]): r[2] for r in rows}
        for (t, pid), entry in ledger.entries.items():
            if t != tenant:
                continue
            real = entry.label if entry.label in entry.urls else None
            got = flagged.get(pid)
            tp += got is not None and got == real
            fp += got is not None and got != real
            fn += real is not None and got != real
            if got != real and len(misses) < 5:
                misses.append(
                    f"{tenant}/#{pid}: label {real}, flagged {got} (strategy {strategy.get(pid)})"
                )
    return LabelMetrics(tp, fp, fn, tuple(misses))


@dataclass(frozen=True)
class Published:
    payloads: int
    flagged_labels: int  # images flagged is_label found in a payload (must be 0)
    real_labels: int  # the seed's real labels found in a payload (detection misses)


SAMPLE_THROUGH_SERVICE = 150


def published_labels(url: str, ledger: Ledger, tenants: list[str]) -> Published:
    """Build every product's Vinted and eBay payloads and look for labels in them.

    Every product goes through the pure converters with its rows loaded in bulk; a sample
    also goes through ``ProductImageService`` and the converter classes (the path the app
    takes, following the stage flag), and must give the very same payloads.
    """
    payloads = flagged = real = 0
    with connect(url) as conn:
        for tenant in tenants:
            products, photos = _bulk(conn, tenant)
            labels = {v.url for views in photos.values() for v in views if v.is_label}
            for pid in _pids(ledger, tenant):
                entry = ledger.entries[(tenant, pid)]
                for conv in (vinted_item, ebay_inventory_item):
                    urls = _payload_urls(conv(products[pid], photos.get(pid, [])).payload)
                    payloads += 1
                    flagged += len(urls & labels)
                    real += entry.label is not None and entry.label in urls
            _same_through_service(url, tenant, products, photos)
    return Published(payloads, flagged, real)


def _bulk(conn: Conn, tenant: str) -> tuple[dict[int, ProductInfo], dict[int, list[ImageView]]]:
    products = {
        int(r[0]): ProductInfo(id=int(r[0]), sku=r[1], title=r[2], brand=r[3], price=r[4])
        for r in conn.execute(
            sql.SQL("SELECT id, sku, title, brand, price FROM {}").format(
                sql.Identifier(tenant, "products")
            )
        )
    }
    photos: dict[int, list[ImageView]] = {}
    for r in conn.execute(
        sql.SQL(
            'SELECT id, product_id, url, "order", is_label FROM {} ORDER BY product_id, "order", id'
        ).format(sql.Identifier(tenant, "product_images"))
    ):
        view = ImageView(id=r[0], product_id=r[1], url=r[2], order=r[3], is_label=r[4])
        photos.setdefault(int(r[1]), []).append(view)
    return products, photos


def _same_through_service(
    url: str,
    tenant: str,
    products: dict[int, ProductInfo],
    photos: dict[int, list[ImageView]],
) -> None:
    engine = make_engine(url, pool_size=1)
    try:
        with tenant_session(engine, tenant) as session, session.begin():
            svc = ProductImageService(session, tenant, settings=ServiceSettings())
            for pid in sorted(products)[:SAMPLE_THROUGH_SERVICE]:
                bulk = vinted_item(products[pid], photos.get(pid, [])).payload
                served = VintedProductConverter(svc).convert(pid).payload
                if _payload_urls(bulk) != _payload_urls(served):
                    raise AssertionError(f"{tenant}/{pid}: service path differs from the rows")
                ebay = EbayProductConversionService(svc).convert(pid).payload
                bulk_ebay = ebay_inventory_item(products[pid], photos.get(pid, [])).payload
                if _payload_urls(ebay) != _payload_urls(bulk_ebay):
                    raise AssertionError(f"{tenant}/{pid}: eBay service path differs")
    finally:
        engine.dispose()


def _pids(ledger: Ledger, tenant: str) -> list[int]:
    return sorted(pid for (t, pid) in ledger.entries if t == tenant)


def _payload_urls(payload: dict[str, Any]) -> set[str]:
    """Image urls of a Vinted item (``photos``) or an eBay item (``imageUrls``)."""
    found: set[str] = set()
    stack: list[Any] = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and node.startswith(("http://", "https://")):
            found.add(node)
    return found


def latency_rows(stats: Stats) -> list[tuple[str, int, float, float]]:
    """(phase, writes, p50 ms, p99 ms) per phase, in the order phases happened."""
    out = []
    for phase, samples in stats.latencies.items():
        if not samples:
            continue
        ordered = sorted(samples)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        out.append((phase, len(samples), statistics.median(ordered) * 1000, p99 * 1000))
    return out
