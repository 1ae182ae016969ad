"""Pure pacing logic for batch jobs: adaptive batch size and a rows-per-second limit."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

# A batch's target duration, which is also about how long its row locks are held. 100 ms,
# not the few hundred ms first chosen: at 300 ms on a fast server up to 1% of the live
# writes met a product locked by a running batch and waited for it, which set their
# p99; at 100 ms almost none did, for about the same throughput, because the batches
# commit asynchronously (ARCHITECTURE.md, "Batches of 100 ms").
DEFAULT_TARGET_MS: Final = 100


@dataclass(frozen=True, kw_only=True)
class BatchSizer:
    """Steer the batch size so that one batch takes about ``target_s``.

    Rows are locked for as long as a batch runs, so the target bounds how long a live
    writer can wait on the backfill. Each step scales by target/elapsed, but at most by
    ``max_step`` either way, so one slow batch (a checkpoint, a vacuum) does not collapse
    the size.
    """

    target_s: float = DEFAULT_TARGET_MS / 1000
    minimum: int = 10
    maximum: int = 20_000
    max_step: float = 2.0

    def next(self, size: int, elapsed_s: float) -> int:
        factor = self.target_s / max(elapsed_s, 1e-4)
        factor = min(self.max_step, max(1 / self.max_step, factor))
        return max(self.minimum, min(self.maximum, round(size * factor)))


@dataclass
class RateLimiter:
    """At most ``rate`` units per second, averaged since the limiter started.

    ``wait(n)`` records ``n`` units done and sleeps until the average is back under the
    rate. ``rate`` None means unlimited.
    """

    rate: float | None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _start: float = field(default=0.0, init=False)
    _done: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._start = self.clock()

    def wait(self, units: int) -> float:
        """Account for ``units``; return the seconds slept."""
        now = self.clock()
        self._done += units
        if not self.rate:
            return 0.0
        due = self._start + self._done / self.rate
        pause = due - now
        if pause > 0:
            self.sleep(pause)
            return pause
        return 0.0
