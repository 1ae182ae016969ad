"""Live traffic for the demo, and the independent ledger it keeps of every write.

Three writers run in threads while the deploy sequence runs:

* ``LegacyWriter``: an old app instance, raw SQL on ``products.images`` (append, remove,
  reorder, delete product, insert product);
* ``ServiceWriter``: new code through ``ProductImageService``;
* ``ApiWriter``: new code through the HTTP API (FastAPI, in-process ASGI transport).

Each writer owns its products (a product belongs to exactly one writer), computes the
expected image list from *its own* previous expectation, writes, and records the
expectation in the :class:`Ledger` only when the transaction committed. The final report
compares the tables against this ledger, never against the tables themselves.

A real label stays the last image (sellers attach the price tag last): writers insert new
photos before it and never remove it. The writers read the seed's label truth for that,
as a seller knows which picture is the tag; detection code never does.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc.db import Conn, connect

log = structlog.get_logger(__name__)

Key = tuple[str, int]  # (tenant, product id)


@dataclass
class Entry:
    urls: list[str]
    owner: str
    label: str | None  # the real label's url, kept last


@dataclass
class Ledger:
    """Expected image urls per product, updated only after a commit."""

    entries: dict[Key, Entry] = field(default_factory=dict)
    deleted: set[Key] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def owned(self, owner: str) -> list[Key]:
        with self.lock:
            return [k for k, e in self.entries.items() if e.owner == owner]

    def get(self, key: Key) -> Entry | None:
        with self.lock:
            entry = self.entries.get(key)
            return None if entry is None else Entry(list(entry.urls), entry.owner, entry.label)

    def put(self, key: Key, entry: Entry) -> None:
        with self.lock:
            self.entries[key] = entry
            self.deleted.discard(key)

    def drop(self, key: Key) -> None:
        with self.lock:
            self.entries.pop(key, None)
            self.deleted.add(key)


@dataclass
class Phase:
    """The deploy step in progress; latencies are filed under it."""

    name: str = "start"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, name: str) -> None:
        with self.lock:
            self.name = name


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, phase: str, seconds: float, error: BaseException | None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
                self.latencies[phase].append(seconds)
            else:
                self.failed += 1
                self.errors[type(error).__name__] += 1


def canonical_urls(images: Any) -> list[str]:
    """Urls in the canonical order: by (order, position), missing order = position."""
    if not isinstance(images, list):
        return []
    keyed = []
    for pos, elem in enumerate(images):
        if isinstance(elem, dict) and isinstance(elem.get("url"), str):
            order = elem.get("order")
            rank = order if isinstance(order, int) and not isinstance(order, bool) else pos
            keyed.append((rank, pos, elem["url"]))
    return [url for _, _, url in sorted(keyed)]


def new_url(tenant: str, rng: random.Random) -> str:
    return f"https://cdn.stoflow.example/{tenant}/live/{rng.getrandbits(64):016x}.jpg"


def with_photo(entry: Entry, url: str) -> list[str]:
    """Add a photo; a real label stays last."""
    if entry.label is not None and entry.urls and entry.urls[-1] == entry.label:
        return [*entry.urls[:-1], url, entry.label]
    return [*entry.urls, url]


def removable(entry: Entry) -> list[str]:
    """Photos that can be removed unambiguously: not the label, not a duplicated url."""
    return [u for u in entry.urls if u != entry.label and entry.urls.count(u) == 1]


def shuffled(entry: Entry, rng: random.Random) -> list[str]:
    photos = [u for u in entry.urls if u != entry.label]
    rng.shuffle(photos)
    return [*photos, entry.label] if entry.label in entry.urls else photos


@dataclass(eq=False)  # a thread: hashed by identity
class Writer(threading.Thread):
    """A thread that performs random operations until stopped, timing each one."""

    name_: str
    url: str
    ledger: Ledger
    phase: Phase
    stats: Stats
    seed: int = 0
    pause_s: float = 0.01
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name=self.name_, daemon=True)
        self.rng = random.Random(self.seed)

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.close()

    def close(self) -> None:
        """Release what the writer opened; called when its thread ends."""

    def _loop(self) -> None:
        while not self.stop.is_set():
            keys = self.ledger.owned(self.name_)
            if not keys:
                time.sleep(0.05)
                continue
            key = self.rng.choice(keys)
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                self.step(key)
            except Exception as exc:  # counted and reported, never silent
                error = exc
                log.warning("traffic write failed", writer=self.name_, error=repr(exc)[:200])
            self.stats.record(self.phase.name, time.perf_counter() - started, error)
            time.sleep(self.pause_s)

    def step(self, key: Key) -> None:
        raise NotImplementedError


class LegacyWriter(Writer):
    """An old app instance: read-modify-write of ``products.images`` with raw SQL."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.conn: Conn | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def step(self, key: Key) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.url, application_name="legacy-app")
        op = self.rng.choices(
            [self.append, self.remove, self.reorder, self.delete, self.insert],
            weights=[35, 20, 25, 5, 15],
        )[0]
        try:
            op(self.conn, key)
        except BaseException:
            self.conn.rollback()
            raise

    def _write(self, conn: Conn, key: Key, urls: list[str]) -> None:
        tenant, pid = key
        products = sql.Identifier(tenant, "products")
        row = conn.execute(
            sql.SQL("SELECT images FROM {} WHERE id = %s FOR UPDATE").format(products), (pid,)
        ).fetchone()
        if row is None:
            raise LookupError(f"{tenant}.products {pid} vanished")
        known = {e["url"]: e for e in row[0] if isinstance(e, dict) and "url" in e}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        images = [{**known.get(u, {"created_at": now}), "url": u, "order": i}
                  for i, u in enumerate(urls)]  # fmt: skip
        conn.execute(
            sql.SQL("UPDATE {} SET images = %s, updated_at = now() WHERE id = %s").format(products),
            (Jsonb(images), pid),
        )

    def _change(self, conn: Conn, key: Key, change: Callable[[Entry], list[str] | None]) -> None:
        entry = self.ledger.get(key)
        if entry is None:
            return
        urls = change(entry)
        if urls is None:
            return
        self._write(conn, key, urls)
        conn.commit()
        self.ledger.put(key, Entry(urls, entry.owner, entry.label))

    def append(self, conn: Conn, key: Key) -> None:
        self._change(conn, key, lambda e: with_photo(e, new_url(key[0], self.rng)))

    def remove(self, conn: Conn, key: Key) -> None:
        def change(e: Entry) -> list[str] | None:
            choices = removable(e)
            if len(e.urls) <= 2 or not choices:
                return None
            gone = self.rng.choice(choices)
            return [u for u in e.urls if u != gone]

        self._change(conn, key, change)

    def reorder(self, conn: Conn, key: Key) -> None:
        self._change(conn, key, lambda e: shuffled(e, self.rng))

    def delete(self, conn: Conn, key: Key) -> None:
        tenant, pid = key
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE id = %s").format(sql.Identifier(tenant, "products")),
            (pid,),
        )
        conn.commit()
        self.ledger.drop(key)

    def insert(self, conn: Conn, key: Key) -> None:
        tenant = key[0]
        urls = [new_url(tenant, self.rng) for _ in range(self.rng.randint(2, 5))]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        images = [{"url": u, "order": i, "created_at": now} for i, u in enumerate(urls)]
        row = conn.execute(
            sql.SQL("INSERT INTO {} (sku, title, images) VALUES (%s, %s, %s) RETURNING id").format(
                sql.Identifier(tenant, "products")
            ),
            (f"LIVE-{self.rng.getrandbits(32):08x}", "Live item", Jsonb(images)),
        ).fetchone()
        conn.commit()
        assert row is not None
        self.ledger.put((tenant, int(row[0])), Entry(urls, self.name_, None))
