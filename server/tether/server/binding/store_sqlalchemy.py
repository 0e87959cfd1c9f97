"""The binding store on SQLAlchemy: SQLite (embedded mode), and the general
path the PostgreSQL store builds on.

Imports load each batch into a temporary table with executemany and merge
it into the list with one INSERT ... ON CONFLICT, sorted by digest so that
index inserts stay local. Every batch is also kept in a staging table: at
the end, REPLACE deletes what the stream did not name, in one statement.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Executable,
    Index,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    delete,
    distinct,
    exists,
    func,
    literal,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.binding.eligible import MAX_REFERENCE
from tether.server.binding.reports import PartnerOutcome, Report, Reporter
from tether.server.binding.store import (
    LIST_COLUMNS,
    STAGING_COLUMNS,
    ListImport,
    Response,
    StagedRow,
)
from tether.server.binding.tables import EligibleAccount
from tether.server.shared.digests import DigestKey
from tether.server.shared.partners import get_partner
from tether.server.storage import dialects
from tether.server.storage.base import UtcDateTime, utcnow
from tether.server.storage.database import Database
from tether.server.storage.idempotency import Once


class SqlAlchemyBindingStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def report(
        self,
        once: Once[Response],
        reporter: Reporter,
        report: Report,
        *,
        settle: Callable[[], Awaitable[None]],
        respond: Callable[[list[PartnerOutcome]], Response],
    ) -> Response:
        async def work(session: AsyncSession) -> Response:
            try:
                outcomes = await reporter.report(session, report)
            finally:
                await settle()
            return respond(outcomes)

        return await once.run(work)

    def list_import(self, session: AsyncSession, partner_id: str, key: DigestKey) -> ListImport:
        return SqlAlchemyListImport(session, partner_id, key)

    async def refresh_list_statistics(self, changed: int) -> None:
        return


class SqlAlchemyListImport:
    def __init__(self, session: AsyncSession, partner_id: str, key: DigestKey) -> None:
        self._session = session
        self._partner_id = partner_id
        self._key = key
        # Every accepted row of the stream, and the rows of the batch being merged.
        self._staging = _temporary_table("import_staging")
        self._batch = _temporary_table("import_batch")

    async def start(self) -> None:
        await get_partner(self._session, self._partner_id)
        connection = await self._session.connection()
        await connection.run_sync(self._staging.create)
        await connection.run_sync(self._batch.create)

    async def write(self, rows: list[StagedRow]) -> None:
        await self._merge(rows)

    async def _merge(self, rows: list[StagedRow]) -> None:
        session, batch = self._session, self._batch
        await self._load(batch, rows)
        await session.execute(self._merge_statement())
        await session.execute(self._staging.insert().from_select(STAGING_COLUMNS, select(batch)))
        await session.execute(batch.delete())

    async def _load(self, table: Table, rows: list[StagedRow]) -> None:
        await self._session.execute(
            table.insert(), [dict(zip(STAGING_COLUMNS, row, strict=True)) for row in rows]
        )

    def _latest_rows(self) -> Select[tuple[object, ...]]:
        """The batch's rows, the last one per account only, in digest order."""
        batch = self._batch
        columns = (
            literal(self._partner_id, String()),
            batch.c.account_kind,
            batch.c.account_digest,
            literal(self._key.key_id, String()),
            batch.c.partner_reference,
            literal(utcnow(), UtcDateTime()),
        )
        latest = select(func.max(batch.c.seq)).group_by(batch.c.account_digest)
        return select(*columns).where(batch.c.seq.in_(latest)).order_by(batch.c.account_digest)

    def _merge_statement(self) -> Executable:
        merge = dialects.insert(self._session, EligibleAccount).from_select(
            LIST_COLUMNS, self._latest_rows()
        )
        # A later entry for an account wins, as with AddEligibleAccounts.
        upsert: Executable = merge.on_conflict_do_update(
            index_elements=["partner_id", "account_digest"],
            set_={"partner_reference": merge.excluded.partner_reference},
            where=EligibleAccount.partner_reference != merge.excluded.partner_reference,
        )
        return upsert

    async def finish(self, replace: bool) -> tuple[int, int]:
        session, staging = self._session, self._staging
        removed = 0
        if replace:
            await self._before_replace()
            result = await session.execute(
                delete(EligibleAccount)
                .where(
                    EligibleAccount.partner_id == self._partner_id,
                    ~exists().where(staging.c.account_digest == EligibleAccount.account_digest),
                )
                .execution_options(synchronize_session=False)
            )
            removed = int(result.rowcount)  # type: ignore[attr-defined]
        imported = await self._imported()
        await self._drop_temporary()
        return imported, removed

    async def _before_replace(self) -> None:
        # SQLite answers NOT EXISTS row by row; this makes each answer cheap.
        connection = await self._session.connection()
        await connection.run_sync(Index(None, self._staging.c.account_digest).create)

    async def _imported(self) -> int:
        counted = select(func.count(distinct(self._staging.c.account_digest)))
        return int(await self._session.scalar(counted) or 0)

    async def _drop_temporary(self) -> None:
        connection = await self._session.connection()
        await connection.run_sync(self._batch.drop)
        await connection.run_sync(self._staging.drop)


def _temporary_table(prefix: str) -> Table:
    """A temporary table of the import's own, gone with its transaction."""
    return Table(
        f"{prefix}_{secrets.token_hex(6)}",
        MetaData(),
        Column("seq", BigInteger, nullable=False),
        Column("account_kind", String(16), nullable=False),
        Column("account_digest", LargeBinary, nullable=False),
        Column("partner_reference", String(MAX_REFERENCE), nullable=False),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )
