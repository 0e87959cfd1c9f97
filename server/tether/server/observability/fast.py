"""Per-call counting for the hot paths (every RPC, every Redis call, each
verdict and report), at a fraction of prometheus_client's cost.

A child's `inc()` takes a lock and runs several checks and Python calls
per increment (and `observe()` walks the buckets); on Evaluate's path that
was about nine of them a call. Here a count is added to a plain number of
this process, and `flush()` moves what gathered into the series' values:
before every scrape of this process (exposition.py) and each
FLUSH_SECONDS (app.py), so a worker's counts reach the shared multiprocess
files within that. Everything runs on the event loop's thread, so the plain
numbers need no lock. It reaches into prometheus_client's value objects
(`_value`, `_sum`, `_buckets`, `_upper_bounds`); tests/test_metrics.py
reads every series back, so a release that moves them fails there, not
silently.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

FLUSH_SECONDS = 1.0

_flushers: list[Callable[[], None]] = []


def flush() -> None:
    """Moves every count gathered since the last flush into its series."""
    for flush_one in _flushers:
        flush_one()


def increment(child: Any) -> Callable[[float], None]:
    """A labelled counter child's increment: call it with the amount."""
    value = child._value
    pending = [0.0]

    def inc(amount: float) -> None:
        pending[0] += amount

    def flush_one() -> None:
        if pending[0]:
            amount, pending[0] = pending[0], 0.0
            value.inc(amount)

    _flushers.append(flush_one)
    return inc


class Observe:
    """A labelled histogram child's observe."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        # Ends with +Inf: every amount finds a bucket.
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = [0.0]
        total, buckets = child._sum, child._buckets
        counts, summed = self._counts, self._sum

        def flush_one() -> None:
            if summed[0]:
                amount, summed[0] = summed[0], 0.0
                total.inc(amount)
            for i, count in enumerate(counts):
                if count:
                    counts[i] = 0
                    buckets[i].inc(count)

        _flushers.append(flush_one)

    def __call__(self, amount: float) -> None:
        self._sum[0] += amount
        self._counts[bisect_left(self._bounds, amount)] += 1


async def keep_flushing() -> None:
    """Flushes each FLUSH_SECONDS until cancelled, and once more then."""
    try:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            flush()
    finally:
        flush()
