"""The binding area's storage interface: the calls whose best SQL differs
by database. app.py picks one implementation: store_postgres.py (asyncpg,
one fused statement per report, COPY for imports) or store_sqlalchemy.py
(SQLite, embedded mode).

Everything else the area stores (list entries, reads, unbinds) is plain
SQLAlchemy on a session, the same on every database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.binding.reports import PartnerOutcome, Report, Reporter
from tether.server.shared.digests import DigestKey
from tether.server.storage.idempotency import Once

Response = TypeVar("Response", bound=Message)

# (position in the stream, account kind, digest, partner reference)
StagedRow = tuple[int, str, bytes, str]
STAGING_COLUMNS = ["seq", "account_kind", "account_digest", "partner_reference"]
LIST_COLUMNS = [
    "partner_id",
    "account_kind",
    "account_digest",
    "key_id",
    "partner_reference",
    "create_time",
]


class ListImport(Protocol):
    """The writes of one import stream into a partner's list, inside the
    import's transaction (staging, merging, REPLACE's removal)."""

    async def start(self) -> None:
        """Checks the partner and prepares the import's temporary tables."""

    async def write(self, rows: list[StagedRow]) -> None:
        """Merges one batch into the list (a later entry for an account wins)."""

    async def finish(self, replace: bool) -> tuple[int, int]:
        """(distinct accounts imported, entries removed); with replace, the
        list's entries the stream did not name are removed."""


class BindingStore(Protocol):
    async def report(
        self,
        once: Once[Response],
        reporter: Reporter,
        report: Report,
        *,
        settle: Callable[[], Awaitable[None]],
        respond: Callable[[list[PartnerOutcome]], Response],
    ) -> Response:
        """Runs a report in once's transaction, the fastest way this database
        allows. settle() is awaited once the report's SQL work is over
        (done or failed) and before the commit; respond() turns the
        outcomes into the stored answer."""

    def list_import(self, session: AsyncSession, partner_id: str, key: DigestKey) -> ListImport:
        """The writes of an import into partner_id's list, digested with key."""

    async def refresh_list_statistics(self, changed: int) -> None:
        """After an import that committed `changed` entries' changes: lets
        the database plan for the list's new size (never raises)."""
