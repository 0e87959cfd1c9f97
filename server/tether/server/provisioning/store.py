"""The provisioning area's storage interface: what differs by database.

- DeliveryStore: the partner streams' leases and confirmations. On
  PostgreSQL, fixed set-based statements on kept asyncpg connections, one
  lease for all of a partner's streams and group-committed confirmations;
  on SQLAlchemy, the general path (leasing, confirmations) in a transaction
  per call. Both make the same decisions and write the same rows.
- Broadcast: wake-ups between the Tether processes of one database
  (PostgreSQL NOTIFY/LISTEN; nothing to tell on SQLite, one process).
- outbox: the binding listener; on PostgreSQL it also offers its writes
  as CTEs of a report's one statement.
- UsageRelay: a device's live usage question reaches the partner's stream
  in whichever process holds one (PostgreSQL advisory locks and NOTIFY; on
  SQLite only this process's streams exist).

app.py picks one ProvisioningStore: store_postgres.py or store_sqlalchemy.py.
Everything else provisioning stores is plain SQLAlchemy on a session.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from tether.server.provisioning.confirmations import Applied, Result
from tether.server.provisioning.leasing import Delivery, Timing
from tether.server.shared.bindings import BindingListener

if TYPE_CHECKING:
    from tether.server.provisioning.usage_queries import UsageQueryOut, UsageReply
    from tether.server.provisioning.wakeup import Wakeup

# Puts a usage query on a stream of the partner in this process.
AskHere = Callable[[str, "UsageQueryOut", float], Awaitable["UsageReply"]]


class DeliveryStore(Protocol):
    async def lease(
        self, partner_id: str, *, owners: Sequence[str], now: datetime
    ) -> list[Delivery]:
        """Leases the partner's deliverable instructions, oldest first: the
        n-th to owners[n], so an owner named k times gets at most k; those
        delivered max_attempts times are parked as dead instead. Returns
        the leased rows in delivery order."""

    async def next_due(self, partner_id: str) -> datetime | None:
        """The partner's next retry or lease expiry (timezone-aware)."""

    async def confirm(
        self, partner_id: str, items: Sequence[tuple[uuid.UUID, Result]]
    ) -> list[Applied]:
        """Applies the partner's results in one transaction; one Applied per
        item, in order; wakes whoever waits for what changed."""

    async def close(self) -> None: ...


class Broadcast(Protocol):
    """Tells the other processes of one database which topics committed."""

    @property
    def listening(self) -> asyncio.Event:
        """Set while the other processes' topics reach this one."""

    def send(self, topics: set[str]) -> None:
        """Queues committed topics for the other processes; never waits."""

    async def start(
        self, heard: Callable[[Sequence[str]], None], reconnected: Callable[[], None]
    ) -> None:
        """heard(topics) for every topic another process committed;
        reconnected() whenever topics may have been missed."""

    async def stop(self) -> None: ...


class UsageRelay(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def stream_opened(self, partner_id: str) -> None:
        """Registers a stream of the partner here; returns once other
        processes can reach it."""

    def stream_closed(self, partner_id: str) -> None: ...

    async def ask_usage(
        self, partner_id: str, query: UsageQueryOut, wait_seconds: float
    ) -> UsageReply:
        """The partner's live answer, from a stream here or elsewhere.
        Raises LookupError when no stream of the partner is reachable,
        TimeoutError when no answer arrives in time."""


class ProvisioningStore(Protocol):
    """Makes the area's database-specific parts; app.py picks one."""

    def broadcast(self) -> Broadcast: ...

    def delivery(self, wakeup: Wakeup, timing: Timing) -> DeliveryStore: ...

    def usage_relay(self, ask_here: AskHere) -> UsageRelay: ...

    def outbox(self, wakeup: Wakeup) -> BindingListener:
        """The binding listener that writes the outbox (app.py hangs it on
        binding's change hook); on PostgreSQL it also writes as part of a
        report's one statement."""
