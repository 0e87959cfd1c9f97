"""Per-call counting for the instrumentation's own hot paths (every RPC,
every Redis call), at a third of prometheus_client's cost.

A child's `inc()` runs two checks and four Python calls before the
addition, and `observe()` walks the buckets in Python; here an increment
is the value's own `inc` (its lock and addition, in memory or in the
multiprocess files alike) and a bucket is found by bisect. It reaches
into prometheus_client's value objects (`_value`, `_sum`, `_buckets`,
`_upper_bounds`); tests/test_metrics.py reads every series back, so a
release that moves them fails there, not silently.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any


def increment(child: Any) -> Callable[[float], None]:
    """A labelled counter child's increment: call it with the amount."""
    inc: Callable[[float], None] = child._value.inc
    return inc


class Observe:
    """A labelled histogram child's observe."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._sum: Callable[[float], None] = child._sum.inc
        self._buckets: list[Callable[[float], None]] = [b.inc for b in child._buckets]
        # Ends with +Inf: every amount finds a bucket.
        self._bounds: list[float] = list(child._upper_bounds)

    def __call__(self, amount: float) -> None:
        self._sum(amount)
        self._buckets[bisect_left(self._bounds, amount)](1)
