"""New-code traffic for the demo: the image service directly, and the HTTP API.

Both writers pick one of their own products, ask the service (or the API) for its images,
choose an operation, and record the expected urls in the ledger once it committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from cdc.traffic import Entry, Key, Writer, new_url, removable, shuffled, with_photo
from services.db import make_engine, tenant_session
from services.heartbeat import Heartbeat
from services.image_service import ProductImageService
from services.image_types import ServiceSettings

Images = list[tuple[int, str]]  # (image id, url) in order


def ids_for(images: Images, urls: list[str]) -> list[int]:
    """Image ids in the order of ``urls`` (urls are unique among what we reorder)."""
    by_url = {u: i for i, u in images}
    return [by_url[u] for u in urls]


class _NewCode(Writer):
    """Shared choice of operation; subclasses say how to talk to the service."""

    def step(self, key: Key) -> None:
        entry = self.ledger.get(key)
        if entry is None:
            return
        images = self.images(key)
        if [u for _, u in images] != entry.urls:
            raise AssertionError(f"{key}: served {len(images)} images, ledger expects another")
        op = self.rng.choices(["add", "remove", "reorder", "read"], weights=[35, 25, 25, 15])[0]
        if op == "add":
            urls = self.add(key, entry, new_url(key[0], self.rng))
        elif op == "remove" and len(entry.urls) > 2 and removable(entry):
            gone = self.rng.choice(removable(entry))
            self.remove(key, ids_for(images, [gone])[0])
            urls = [u for u in entry.urls if u != gone]
        elif op == "reorder" and len(set(entry.urls)) == len(entry.urls):
            urls = shuffled(entry, self.rng)
            self.reorder(key, ids_for(images, urls))
        else:
            return
        self.ledger.put(key, Entry(urls, entry.owner, entry.label))

    def images(self, key: Key) -> Images:
        raise NotImplementedError

    def add(self, key: Key, entry: Entry, url: str) -> list[str]:
        """Add a photo, keeping a real label last; return the urls as committed."""
        raise NotImplementedError

    def remove(self, key: Key, image_id: int) -> None:
        raise NotImplementedError

    def reorder(self, key: Key, ids: list[int]) -> None:
        raise NotImplementedError


def _image(url: str) -> dict[str, Any]:
    return {"url": url, "mime_type": "image/jpeg", "file_size": 180_000, "alt_text": "live"}


@dataclass(eq=False)
class ServiceWriter(_NewCode):
    """New code calling ``ProductImageService`` in its own transaction per operation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.engine = make_engine(self.url, pool_size=2)
        # Report the stage this instance serves, as a deployed service does.
        self.heartbeat = Heartbeat(self.url)
        self.settings = ServiceSettings(heartbeat=self.heartbeat)

    def close(self) -> None:
        self.heartbeat.close()
        self.engine.dispose()

    def _service(self, tenant: str) -> tuple[Any, ProductImageService]:
        session = tenant_session(self.engine, tenant)
        return session, ProductImageService(session, tenant, settings=self.settings)

    def images(self, key: Key) -> Images:
        session, svc = self._service(key[0])
        with session, session.begin():
            return [(v.id, v.url) for v in svc.list_images(key[1])]

    def add(self, key: Key, entry: Entry, url: str) -> list[str]:
        urls = with_photo(entry, url)
        session, svc = self._service(key[0])
        with session, session.begin():  # one transaction: add, then move the label last
            svc.add_image(key[1], _image(url))
            if urls[-1] != url:
                ids = [v.id for v in svc.list_images(key[1])]
                ids[-2], ids[-1] = ids[-1], ids[-2]
                svc.reorder_images(key[1], ids)
        return urls

    def remove(self, key: Key, image_id: int) -> None:
        session, svc = self._service(key[0])
        with session, session.begin():
            svc.delete_image(image_id)

    def reorder(self, key: Key, ids: list[int]) -> None:
        session, svc = self._service(key[0])
        with session, session.begin():
            svc.reorder_images(key[1], ids)


@dataclass(eq=False)
class ApiWriter(_NewCode):
    """New code over HTTP; ``client`` carries the base URL, ``keys`` an API key per tenant."""

    client: httpx.Client | None = None
    keys: dict[str, str] | None = None

    def _call(self, method: str, key: Key, path: str = "", **kw: Any) -> httpx.Response:
        assert self.client is not None
        assert self.keys is not None
        tenant, pid = key
        response = self.client.request(
            method, f"/v1/tenants/{tenant}/products/{pid}/images{path}",
            headers={"x-api-key": self.keys[tenant]}, **kw,
        )  # fmt: skip
        response.raise_for_status()
        return response

    def images(self, key: Key) -> Images:
        body = self._call("GET", key).json()
        return [(int(i["id"]), str(i["url"])) for i in body["images"]]

    def add(self, key: Key, entry: Entry, url: str) -> list[str]:
        self._call("POST", key, json=_image(url))
        urls = with_photo(entry, url)
        if urls[-1] == url:
            return urls
        try:  # a second request moves the label back behind the new photo
            ids = [i for i, _ in self.images(key)]
            ids[-2], ids[-1] = ids[-1], ids[-2]
            self._call("PUT", key, "/order", json={"image_ids": ids})
        except Exception:
            self.ledger.put(key, Entry([*entry.urls, url], entry.owner, entry.label))
            raise
        return urls

    def remove(self, key: Key, image_id: int) -> None:
        self._call("DELETE", key, f"/{image_id}")

    def reorder(self, key: Key, ids: list[int]) -> None:
        self._call("PUT", key, "/order", json={"image_ids": ids})
