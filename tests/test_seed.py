"""The seed: deterministic, production-shaped totals, realistic mess, separate label truth."""

from __future__ import annotations

import hashlib

import psycopg
import pytest

from cdc.errors import SeedExistsError
from cdc.seed import SeedConfig, seed


def fingerprint(url: str) -> str:
    """A hash of every tenant's products and the label truth, in a stable order."""
    digest = hashlib.sha256()
    with psycopg.connect(url) as conn:
        for tenant in ("user_1", "user_2", "user_4", "user_5", "template_tenant"):
            for row in conn.execute(
                f'SELECT id, sku, title, brand, price, created_at, images::text FROM "{tenant}"'
                ".products ORDER BY id"
            ):
                digest.update(repr(row).encode())
        for row in conn.execute("SELECT * FROM seed_truth.labels ORDER BY tenant, product_id"):
            digest.update(repr(row).encode())
    return digest.hexdigest()


def test_defaults_match_production_totals(database_url: str) -> None:
    """3,282 products, all with 2+ images, 611 with a label as last image, in the real tenants."""
    with psycopg.connect(database_url) as conn:
        counts = seed(conn, SeedConfig())
        assert counts == {
            "user_1": 1314, "user_2": 984, "user_4": 656, "user_5": 328, "template_tenant": 0,
        }  # fmt: skip
        totals = conn.execute(
            "SELECT count(*), min(jsonb_array_length(images)) FROM ("
            " SELECT images FROM user_1.products UNION ALL SELECT images FROM user_2.products"
            " UNION ALL SELECT images FROM user_4.products"
            " UNION ALL SELECT images FROM user_5.products) p"
        ).fetchone()
        labels = conn.execute("SELECT count(*) FROM seed_truth.labels").fetchone()
        last_is_label = conn.execute(
            "SELECT count(*) FROM seed_truth.labels l JOIN user_1.products p "
            "ON l.tenant = 'user_1' AND p.id = l.product_id WHERE p.images -> -1 ->> 'url' = l.url"
        ).fetchone()
        truth_user_1 = conn.execute(
            "SELECT count(*) FROM seed_truth.labels WHERE tenant = 'user_1'"
        ).fetchone()
    assert totals == (3282, 2)
    assert labels == (611,)
    assert last_is_label == truth_user_1


def test_same_seed_same_data_and_other_seed_other_data(pg_urls: tuple[str, str, str]) -> None:
    """Two databases seeded with --seed 5 are identical; --seed 6 differs."""
    a, b, c = pg_urls
    config = SeedConfig(products=400, labels=50, seed=5)
    for url, cfg in ((a, config), (b, config), (c, SeedConfig(products=400, labels=50, seed=6))):
        with psycopg.connect(url) as conn:
            seed(conn, cfg)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)


def test_mess_is_present_at_the_configured_share(database_url: str) -> None:
    """Missing and duplicate order, http URLs and duplicate URLs all occur."""
    with psycopg.connect(database_url) as conn:
        seed(conn, SeedConfig(products=2000, labels=100, mess_share=0.2))
        row = conn.execute(
            """
            WITH e AS (
              SELECT p.id, x.elem, x.pos FROM user_1.products p,
                     jsonb_array_elements(p.images) WITH ORDINALITY AS x(elem, pos))
            SELECT
              count(DISTINCT id) FILTER (WHERE NOT elem ? 'order'),
              count(DISTINCT id) FILTER (WHERE elem ->> 'url' LIKE 'http:%'),
              (SELECT count(*) FROM (SELECT id FROM e GROUP BY id, elem ->> 'url'
                                     HAVING count(*) > 1) d),
              (SELECT count(*) FROM (SELECT id FROM e WHERE elem ? 'order'
                                     GROUP BY id, elem -> 'order' HAVING count(*) > 1) o),
              count(DISTINCT id)
            FROM e
            """
        ).fetchone()
    assert row is not None
    missing, http, dup_url, dup_order, products = row
    for kind in (missing, http, dup_url, dup_order):
        assert 0 < kind < products * 0.2


def test_refuses_to_overwrite_without_reset(database_url: str) -> None:
    """Seeding over existing tenants is refused unless reset is asked for."""
    with psycopg.connect(database_url) as conn:
        seed(conn, SeedConfig(products=40, labels=4))
        with pytest.raises(SeedExistsError, match="user_1"):
            seed(conn, SeedConfig(products=40, labels=4))
        conn.rollback()
        counts = seed(conn, SeedConfig(products=50, labels=5), reset=True)
    assert sum(counts.values()) == 50


@pytest.mark.parametrize(
    "kwargs",
    [{"products": 3, "tenants": 4}, {"labels": 5000}, {"mess_share": 1.5}, {"min_images": 1}],
)
def test_bad_config_is_refused(kwargs: dict[str, float]) -> None:
    """Impossible seed parameters are refused before anything is written."""
    with pytest.raises(ValueError):  # noqa: PT011 - the message is checked by the CLI test
        SeedConfig(**kwargs)  # type: ignore[arg-type]
