"""The stage per tenant as services read it: cached for at most one second.

A flag change (``cdc.cutover``) reaches every reader within the TTL without a restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cdc.stage import Stage


class StageCache:
    """Stage per tenant, cached for at most ``ttl`` seconds (≤ 1 s), thread-safe.

    Readers go through it, so a flag change reaches every service within ``ttl`` without
    a restart. Writers do not: they read the stage under a row lock in their own
    transaction (``FOR KEY SHARE``), which ``set_stage``'s ``FOR UPDATE`` waits for, so a
    write never lands on the wrong side of a stage change.
    """

    def __init__(self, ttl: float = 1.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= ttl <= 1.0:
            raise ValueError("the stage cache TTL must be between 0 and 1 second")
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Stage]] = {}

    def get(self, tenant: str, load: Callable[[], Stage]) -> Stage:
        """The cached stage, or ``load()`` when the entry is missing or older than ttl."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(tenant)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        stage = load()
        with self._lock:
            self._entries[tenant] = (now, stage)
        return stage

    def invalidate(self, tenant: str | None = None) -> None:
        """Forget one tenant's entry, or all of them."""
        with self._lock:
            if tenant is None:
                self._entries.clear()
            else:
                self._entries.pop(tenant, None)
