"""The HTTP API over HTTP (FastAPI TestClient on httpx): keys, tenants, errors, payloads."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from cdc.stage import Stage
from services import api_keys
from services.api import create_app
from tests.cutover_helpers import PG, bring_to, snapshot

with warnings.catch_warnings():
    # Starlette 1.x asks for the httpx2 fork in its TestClient; httpx (pinned) works.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

T = "user_2"
P = 4
BASE = f"/v1/tenants/{T}/products/{P}"
JPEG = {"url": "https://cdn.example/api.jpg", "mime_type": "image/jpeg"}


@pytest.fixture
def keys(migrated_url: str) -> dict[str, str]:
    """One API key per tenant used here."""
    with psycopg.connect(migrated_url) as conn:
        return {t: api_keys.create_key(conn, t) for t in ("user_1", "user_2", "user_5")}


@pytest.fixture
def client(migrated_url: str, keys: dict[str, str]) -> Iterator[TestClient]:
    """A client speaking HTTP to the app, authenticated as user_2."""
    with TestClient(create_app(migrated_url), headers={"X-API-Key": keys[T]}) as c:
        yield c


def _ids(client: TestClient) -> list[int]:
    return [i["id"] for i in client.get(f"{BASE}/images").json()["images"]]


def test_openapi_is_served(client: TestClient) -> None:
    """/openapi.json describes every route; /docs renders."""
    spec = client.get("/openapi.json").json()
    assert f"{BASE.replace(T, '{tenant}').replace(str(P), '{product_id}')}/images" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_a_key_is_required(client: TestClient) -> None:
    """No key or an unknown key: 401 with a clear body."""
    for headers in ({"X-API-Key": ""}, {"X-API-Key": "not-a-key"}):
        response = client.get(f"{BASE}/images", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "InvalidApiKeyError"
    stored = client.app.state.units.engine  # type: ignore[attr-defined]
    with stored.connect() as conn:
        hashes = [r[0] for r in conn.exec_driver_sql("SELECT key_hash FROM imgmig.api_keys")]
    assert all(len(h) == 64 for h in hashes)


def test_another_tenants_key_is_refused_and_touches_nothing(
    client: TestClient, conn: PG, keys: dict[str, str]
) -> None:
    """A user_1 key on user_2's product: 403 for every verb, nothing read or written."""
    before = snapshot(conn, T, P)
    other = {"X-API-Key": keys["user_1"]}
    ids = _ids(client)
    calls = [
        client.get(f"{BASE}/images", headers=other),
        client.post(f"{BASE}/images", json=JPEG, headers=other),
        client.delete(f"{BASE}/images/{ids[0]}", headers=other),
        client.put(f"{BASE}/images/order", json={"image_ids": ids[::-1]}, headers=other),
        client.put(f"{BASE}/images/{ids[0]}/label", json={"is_label": True}, headers=other),
        client.get(f"{BASE}/marketplaces/vinted/preview", headers=other),
    ]
    assert [c.status_code for c in calls] == [403] * 6
    assert calls[0].json()["error"] == "TenantForbiddenError"
    assert "user_1" not in calls[0].text
    assert snapshot(conn, T, P) == before


def test_a_product_of_another_tenant_is_not_found(client: TestClient, keys: dict[str, str]) -> None:
    """user_5 has fewer products than user_1: user_1's product 100 is a 404 for user_5."""
    response = client.get(
        "/v1/tenants/user_5/products/100/images", headers={"X-API-Key": keys["user_5"]}
    )
    assert response.status_code == 404
    assert response.json()["detail"]["product_id"] == 100


def test_every_verb_over_http_in_dual_write(client: TestClient, conn: PG) -> None:
    """list, add, label, reorder, delete and both previews; JSONB and table stay in sync."""
    bring_to(conn, T, Stage.DUAL_WRITE)
    start = client.get(f"{BASE}/images").json()
    assert start["stage"] == "dual_write"
    added = client.post(f"{BASE}/images", json={**JPEG, "file_size": 10, "alt_text": "a"})
    assert added.status_code == 201
    assert added.json()["alt_text"] == "a"
    label = client.put(f"{BASE}/images/{added.json()['id']}/label", json={"is_label": True})
    assert label.json()["is_label"] is True
    ids = _ids(client)
    order = client.put(f"{BASE}/images/order", json={"image_ids": ids[::-1]}).json()
    assert [i["id"] for i in order["images"]] == ids[::-1]
    assert client.delete(f"{BASE}/images/{ids[0]}").status_code == 204
    urls = [i["url"] for i in start["images"][1:]][::-1]
    vinted = client.get(f"{BASE}/marketplaces/vinted/preview").json()
    assert [p["url"] for p in vinted["payload"]["photos"]] == urls
    ebay = client.get(f"{BASE}/marketplaces/ebay/preview").json()
    assert JPEG["url"] not in ebay["payload"]["body"]["product"]["imageUrls"]
    row = conn.execute(
        "SELECT imgmig.images_hash(images) = imgmig.rows_hash(%s, id) FROM user_2.products "
        "WHERE id = %s",
        (T, P),
    ).fetchone()
    assert row == (True,)


@dataclass(frozen=True)
class Bad:
    verb: str
    path: str
    status: int
    error: str
    body: Any = None


IMAGES = f"{BASE}/images"
ORDER_1, LABEL = {"image_ids": [1]}, {"is_label": True}
INVALID, REQUEST = "InvalidImageError", "RequestValidationError"
BAD = {
    "unknown product": Bad("get", f"{BASE[:-2]}/9999/images", 404, "ProductNotFoundError"),
    "unknown image": Bad("delete", f"{IMAGES}/987654", 404, "ImageNotFoundError"),
    "image id past bigint": Bad("delete", f"{IMAGES}/{10**30}", 404, "ImageNotFoundError"),
    "image of another product": Bad("delete", IMAGES + "/{other}", 404, "ImageNotFoundError"),
    "not a permutation": Bad("put", f"{IMAGES}/order", 422, "NotAPermutationError", ORDER_1),
    "second label": Bad("put", IMAGES + "/{second}/label", 409, "LabelConflictError", LABEL),
    "javascript url": Bad("post", IMAGES, 422, INVALID, {**JPEG, "url": "javascript:x()"}),
    "http url": Bad("post", IMAGES, 422, INVALID, {**JPEG, "url": "http://cdn.example/a.jpg"}),
    "oversized file": Bad("post", IMAGES, 422, INVALID, {**JPEG, "file_size": 10**9}),
    "unknown mime type": Bad("post", IMAGES, 422, INVALID, {**JPEG, "mime_type": "text/html"}),
    "size as a string": Bad("post", IMAGES, 422, REQUEST, {**JPEG, "file_size": "12"}),
    "unknown field": Bad("post", IMAGES, 422, REQUEST, {**JPEG, "owner": "x"}),
    "unknown marketplace": Bad("get", f"{BASE}/marketplaces/etsy/preview", 422, REQUEST),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_maps_to_a_status_and_writes_nothing(
    client: TestClient, conn: PG, case: str
) -> None:
    """Each bad request gets its status and typed error body; both sides are unchanged."""
    bad = BAD[case]
    ids = _ids(client)
    client.put(f"{BASE}/images/{ids[0]}/label", json={"is_label": True})
    other = client.get(f"/v1/tenants/{T}/products/{P + 1}/images").json()["images"]
    before = snapshot(conn, T, P)
    response = client.request(
        bad.verb.upper(), bad.path.format(other=other[0]["id"], second=ids[1]), json=bad.body
    )
    assert response.status_code == bad.status, response.text
    assert response.json()["error"] == bad.error
    assert response.json()["message"]
    assert snapshot(conn, T, P) == before


def test_a_flag_change_reaches_the_running_app_and_its_heartbeat(
    client: TestClient, conn: PG
) -> None:
    """A flag flip reaches the running app without restart and shows in its heartbeat."""
    assert client.get(IMAGES).json()["stage"] == "jsonb"
    bring_to(conn, T, Stage.TABLE)
    for _ in range(100):
        if client.get(IMAGES).json()["stage"] == "table":
            break
        time.sleep(0.05)
    assert client.get(IMAGES).json()["stage"] == "table"
    beats = conn.execute(
        "SELECT stage FROM imgmig.reader_heartbeats WHERE tenant = %s", (T,)
    ).fetchall()
    assert beats == [("table",)]
