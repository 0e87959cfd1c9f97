"""The guard's storage interface: the durable record's writes, whose best
SQL differs by database. app.py picks store_postgres.py or
store_sqlalchemy.py; policies, links and the rebuild read through plain
SQLAlchemy sessions on either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tether.server.guard.recorder import Batch


class GuardStore(Protocol):
    async def write(self, batch: Batch) -> None:
        """Writes one batch of the record (entries put and dropped, links,
        identities) atomically."""
