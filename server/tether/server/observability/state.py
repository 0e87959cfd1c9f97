"""Gauges of what SQL holds, read when Prometheus scrapes (at most once per
CACHE_SECONDS): active bindings, instructions by state, and the age of
each partner's oldest undelivered instruction.

They are state shared by every worker and replica, so no process tracks
them: the serving process reads them (and only it registers this
collector, so workers never sum them). app.py hands in the read.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tether.server import logs

log = logs.get(__name__)

CACHE_SECONDS = 5.0


@dataclass
class Snapshot:
    bindings_active: dict[str, int] = field(default_factory=dict)
    # (partner_id, state) -> count
    instructions: dict[tuple[str, str], int] = field(default_factory=dict)
    # partner_id -> seconds; partners with nothing undelivered are absent.
    oldest_undelivered_seconds: dict[str, float] = field(default_factory=dict)


class StateCollector(Collector):
    def __init__(self, read: Callable[[], Awaitable[Snapshot]]) -> None:
        self._read = read
        self.cache_seconds = CACHE_SECONDS
        self._snapshot: Snapshot | None = None
        self._read_at = 0.0

    async def refresh(self) -> None:
        """Reads SQL again if the last read is older than cache_seconds; a
        failed read leaves the series out rather than failing the scrape."""
        if self._snapshot is not None and time.monotonic() - self._read_at < self.cache_seconds:
            return
        try:
            self._snapshot = await self._read()
        except Exception as exc:
            log.warning("metrics: SQL state not read", error=str(exc))
            self._snapshot = None
            return
        self._read_at = time.monotonic()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._snapshot
        if snapshot is None:
            return
        active = GaugeMetricFamily(
            "tether_bindings_active", "Active bindings, by partner.", labels=["partner_id"]
        )
        for partner_id, count in sorted(snapshot.bindings_active.items()):
            active.add_metric([partner_id], count)
        yield active
        instructions = GaugeMetricFamily(
            "tether_provisioning_instructions",
            "Instructions in SQL, by partner and state.",
            labels=["partner_id", "state"],
        )
        for (partner_id, state), count in sorted(snapshot.instructions.items()):
            instructions.add_metric([partner_id, state], count)
        yield instructions
        oldest = GaugeMetricFamily(
            "tether_provisioning_oldest_undelivered_seconds",
            "Age of the partner's oldest instruction not yet confirmed (pending or leased).",
            labels=["partner_id"],
        )
        for partner_id, seconds in sorted(snapshot.oldest_undelivered_seconds.items()):
            oldest.add_metric([partner_id], seconds)
        yield oldest
