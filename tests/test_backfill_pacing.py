"""Pure pacing logic: adaptive batch size and the rate limit (no database)."""

from __future__ import annotations

from cdc.pacing import BatchSizer, RateLimiter


def test_batch_grows_when_batches_are_fast() -> None:
    """A batch well under the target doubles (bounded step)."""
    assert BatchSizer(target_s=0.3).next(500, 0.01) == 1000


def test_batch_shrinks_when_batches_are_slow() -> None:
    """A batch over the target shrinks in proportion, by at most half."""
    sizer = BatchSizer(target_s=0.3)
    assert sizer.next(1000, 0.4) == 750
    assert sizer.next(1000, 5.0) == 500


def test_default_batches_aim_at_100_ms() -> None:
    """By default a batch (and its row locks) aims at 100 ms: a 150 ms batch shrinks to
    two thirds, a 50 ms one doubles."""
    assert BatchSizer().next(3000, 0.15) == 2000
    assert BatchSizer().next(3000, 0.05) == 6000


def test_batch_size_stays_within_bounds() -> None:
    """The size never leaves [minimum, maximum]."""
    sizer = BatchSizer(target_s=0.3, minimum=10, maximum=2000)
    assert sizer.next(1500, 0.001) == 2000
    assert sizer.next(12, 10.0) == 10


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_limit_sleeps_to_the_average_rate() -> None:
    """1,000 rows done instantly at 500 rows/s waits 2 s in total."""
    clock = FakeClock()
    limiter = RateLimiter(500, clock=clock, sleep=clock.sleep)
    limiter.wait(600)
    limiter.wait(400)
    assert abs(sum(clock.slept) - 2.0) < 1e-9


def test_no_rate_limit_never_sleeps() -> None:
    """Without --max-rate the limiter only counts."""
    clock = FakeClock()
    limiter = RateLimiter(None, clock=clock, sleep=clock.sleep)
    limiter.wait(10**6)
    assert clock.slept == []
