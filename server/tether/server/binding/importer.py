"""Bulk import of an eligible list, inside one transaction per stream.

ImportRun keeps that transaction in a task of its own, fed by the stream.

Each batch is normalized and digested, loaded into a temporary table (COPY
on PostgreSQL, executemany on SQLite) and merged into the list with one
INSERT ... ON CONFLICT, sorted by digest so that index inserts stay local.
On PostgreSQL a batch whose accounts are all new (a first import, the
common case) is instead copied straight into the list, about twice as fast
as the merge: that COPY runs under a savepoint, and if an account turns out
to be listed already, it is undone and the stream goes on with the merge.
While PostgreSQL merges one batch, the next one is being normalized (in a
worker process when TETHER_IMPORT_WORKERS > 0), so the two costs overlap.
Every batch is also kept in a staging table: at the end, REPLACE deletes
what the stream did not name, in one statement. A stream that fails or is
cancelled rolls the transaction back, so it changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import secrets
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import asyncpg
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
    text,
)
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import logs
from tether.server.admin.service import get_partner
from tether.server.shared import accounts
from tether.server.binding.eligible import MAX_REFERENCE
from tether.server.binding.tables import EligibleAccount
from tether.server.shared.digests import Digester, DigestKey
from tether.server.errors import FieldViolation, InvalidArgument
from tether.server.storage import dialects
from tether.server.storage.base import UtcDateTime, utcnow
from tether.server.storage.database import Database

log = logs.get(__name__)

MAX_REPORTED_REJECTIONS = 100

# (account kind or "" when unknown, value, region hint, partner reference)
RawEntry = tuple[str, str, str, str]
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


@dataclass(frozen=True)
class Rejection:
    index: int
    field: str
    description: str


@dataclass(frozen=True)
class ImportSpec:
    """What an import stream asked for, from its header."""

    partner_id: str
    # The list becomes exactly the stream (else: the stream is added).
    replace: bool
    # Fail beyond this many invalid entries; 0: report any number.
    max_rejected: int = 0


@dataclass
class ImportResult:
    received: int = 0
    imported: int = 0
    rejected: int = 0
    removed: int = 0
    rejections: list[Rejection] = field(default_factory=list)


def prepare(
    key: DigestKey, first_index: int, entries: Sequence[RawEntry]
) -> tuple[list[StagedRow], list[Rejection]]:
    """Normalizes and digests one batch: the hot loop of an import.

    A plain function of picklable values, so it can run in a worker process.
    """
    normalize = accounts.normalize_account
    rows: list[StagedRow] = []
    rejections: list[Rejection] = []
    for offset, (kind, value, region_hint, reference) in enumerate(entries):
        index = first_index + offset
        if not kind:
            rejections.append(Rejection(index, "account.kind", "unknown account kind"))
            continue
        if len(reference) > MAX_REFERENCE or not reference.isprintable():
            rejections.append(
                Rejection(
                    index,
                    "partner_reference",
                    f"at most {MAX_REFERENCE} printable characters on one line",
                )
            )
            continue
        try:
            normalized = normalize(kind, value, region_hint)
        except ValueError as exc:
            rejections.append(Rejection(index, "account.value", str(exc)))
            continue
        rows.append((index, kind, key.digest(kind, normalized), reference))
    return rows, rejections


class Import:
    """One import stream, inside the caller's transaction.

    Call start(), add() per batch, then finish(); always close() (in a
    finally) so that no write is left running when the transaction ends.
    """

    def __init__(
        self,
        session: AsyncSession,
        digester: Digester,
        spec: ImportSpec,
        executor: Executor | None = None,
    ) -> None:
        self._session = session
        self._key = digester.current
        self._partner_id = spec.partner_id
        self._replace = spec.replace
        self._max_rejected = spec.max_rejected
        self._executor = executor
        self._postgres = dialects.is_postgres(session)
        # Every accepted row of the stream, and the rows of the batch being merged.
        self._staging = _temporary_table("import_staging")
        self._batch = _temporary_table("import_batch")
        self._writing: asyncio.Task[None] | None = None
        # Copy batches straight into the list until one meets a listed account.
        self._direct = self._postgres
        # Rows copied straight in: distinct accounts, the unique index saw to it.
        self._copied = 0
        self.result = ImportResult()

    async def start(self) -> None:
        await get_partner(self._session, self._partner_id)
        connection = await self._session.connection()
        await connection.run_sync(self._staging.create)
        await connection.run_sync(self._batch.create)
        if self._postgres:
            # Sorting a batch by digest and REPLACE's anti-join stay in memory.
            await self._session.execute(text("SET LOCAL work_mem = '64MB'"))

    async def add(self, entries: Sequence[RawEntry]) -> None:
        first = self.result.received
        self.result.received += len(entries)
        if self._executor is None:
            rows, rejections = prepare(self._key, first, entries)
        else:
            loop = asyncio.get_running_loop()
            rows, rejections = await loop.run_in_executor(
                self._executor, prepare, self._key, first, entries
            )
        self._note(rejections)
        await self._wait_for_writing()
        if rows:
            # Runs while the caller receives and normalizes the next batch.
            self._writing = asyncio.create_task(self._write(rows))

    def _note(self, rejections: list[Rejection]) -> None:
        result = self.result
        result.rejected += len(rejections)
        room = MAX_REPORTED_REJECTIONS - len(result.rejections)
        result.rejections.extend(rejections[: max(room, 0)])
        if self._max_rejected and result.rejected > self._max_rejected:
            raise InvalidArgument(
                ErrorReason.ERROR_REASON_INVALID_FIELD,
                f"more than {self._max_rejected} invalid entries; nothing was imported",
                violations=[
                    FieldViolation(f"entries[{r.index}].{r.field}", r.description)
                    for r in result.rejections[:20]
                ],
            )

    async def _wait_for_writing(self) -> None:
        writing = self._writing
        if writing is not None:
            # Shielded: if the stream is cancelled now, the write must still end
            # cleanly (close() awaits it) rather than stop half-way.
            await asyncio.shield(writing)
            self._writing = None

    async def close(self) -> None:
        """Lets a write still running (the stream failed) end before the rollback.

        It is awaited, not cancelled: a statement cut off half-way can leave
        the connection unusable for the rollback (and SQLite locked).
        """
        writing, self._writing = self._writing, None
        if writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(writing)

    async def _write(self, rows: list[StagedRow]) -> None:
        if self._direct and await self._copy_into_list(rows):
            self._copied += len(rows)
            await self._load(self._staging, rows)
            return
        session, batch = self._session, self._batch
        await self._load(batch, rows)
        await session.execute(self._merge_statement())
        await session.execute(self._staging.insert().from_select(STAGING_COLUMNS, select(batch)))
        await session.execute(batch.delete())

    async def _copy_into_list(self, rows: list[StagedRow]) -> bool:
        """Copies a batch of new accounts straight into the list; False if it can't.

        It can't when the batch names an account twice (the merge keeps the
        last entry) or names one already listed (the unique index refuses the
        COPY, and the savepoint undoes it). After one refusal the stream stays
        on the merge: a list being re-imported would be refused every time.
        """
        digests = {row[2] for row in rows}
        if len(digests) < len(rows):
            self._direct = False
            return False
        now = utcnow()
        records = sorted(
            (
                (self._partner_id, kind, digest, self._key.key_id, reference, now)
                for _, kind, digest, reference in rows
            ),
            key=operator.itemgetter(2),  # digest order keeps index inserts local
        )
        session = self._session
        await session.execute(text("SAVEPOINT import_direct"))
        try:
            await self._copy(EligibleAccount.__tablename__, records, LIST_COLUMNS)
        except asyncpg.UniqueViolationError:
            await session.execute(text("ROLLBACK TO SAVEPOINT import_direct"))
            self._direct = False
            return False
        await session.execute(text("RELEASE SAVEPOINT import_direct"))
        return True

    async def _copy(
        self, table: str, records: Sequence[tuple[object, ...]], columns: list[str]
    ) -> None:
        connection = await self._session.connection()
        raw = await connection.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            table, records=records, columns=columns
        )

    async def _load(self, table: Table, rows: list[StagedRow]) -> None:
        if self._postgres:
            await self._copy(table.name, rows, STAGING_COLUMNS)
            return
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

    async def finish(self) -> ImportResult:
        """Completes the import; the caller then commits."""
        await self._wait_for_writing()
        session, staging = self._session, self._staging
        if self._replace:
            if self._postgres:
                # Temporary tables get no automatic statistics; the anti-join needs them.
                await session.execute(text(f"ANALYZE {staging.name}"))
            else:
                # SQLite answers NOT EXISTS row by row; this makes each answer cheap.
                connection = await session.connection()
                await connection.run_sync(Index(None, staging.c.account_digest).create)
            removed = await session.execute(
                delete(EligibleAccount)
                .where(
                    EligibleAccount.partner_id == self._partner_id,
                    ~exists().where(staging.c.account_digest == EligibleAccount.account_digest),
                )
                .execution_options(synchronize_session=False)
            )
            self.result.removed = int(removed.rowcount)  # type: ignore[attr-defined]
        if self._direct:
            # Every batch went straight in, so no account came twice: skip the count.
            self.result.imported = self._copied
        else:
            counted = select(func.count(distinct(staging.c.account_digest)))
            self.result.imported = int(await session.scalar(counted) or 0)
        if not self._postgres:
            connection = await session.connection()
            await connection.run_sync(self._batch.drop)
            await connection.run_sync(staging.drop)
        return self.result


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


class _Aborted(Exception):
    """The stream failed or was cancelled: roll the import back."""


_END = object()
_ABORT = object()


class ImportRun:
    """An import in a task of its own, fed batch by batch by the stream.

    The stream's handler can be cancelled at any await; database work must
    not be (a statement cut off half-way can leave the connection unusable
    and SQLite locked). So the transaction lives in this task: a failed or
    cancelled stream tells it to roll back, and waits until it has.
    """

    def __init__(
        self,
        db: Database,
        digester: Digester,
        spec: ImportSpec,
        executor: Executor | None = None,
    ) -> None:
        # Two batches in flight at most: memory stays bounded for any stream.
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=2)
        self._task = asyncio.create_task(self._run(db, digester, spec, executor))

    async def add(self, entries: Sequence[RawEntry]) -> None:
        await self._put(entries)

    async def finish(self) -> ImportResult:
        await self._put(_END)
        return await asyncio.shield(self._task)

    async def abort(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_ABORT)
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._task)

    async def _put(self, item: object) -> None:
        """Queues an item, or raises what ended the import early (a bad partner...)."""
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            self._task.result()  # the import failed: raise its error
            raise AssertionError("import ended without a result")

    async def _run(
        self, db: Database, digester: Digester, spec: ImportSpec, executor: Executor | None
    ) -> ImportResult:
        result = await self._import(db, digester, spec, executor)
        await refresh_statistics(db, result.imported + result.removed)
        return result

    async def _import(
        self, db: Database, digester: Digester, spec: ImportSpec, executor: Executor | None
    ) -> ImportResult:
        async with db.transaction() as session:
            job = Import(session, digester, spec, executor)
            try:
                await job.start()
                while True:
                    item = await self._queue.get()
                    if item is _END:
                        return await job.finish()
                    if item is _ABORT:
                        raise _Aborted
                    await job.add(item)  # type: ignore[arg-type]
            finally:
                await job.close()


# An import that changes at least this share of the list (and this many
# entries) has the list's planner statistics taken at once, after it commits.
STATISTICS_SHARE = 0.1
STATISTICS_MIN_ROWS = 1_000


async def refresh_statistics(db: Database, changed: int) -> None:
    """ANALYZE the eligible list after an import that changed much of it.

    PostgreSQL connections keep the plans they made while the list was
    small: a sequential scan chosen for a nearly empty list would stay, and
    every report would read the whole list of millions, until autovacuum's
    next analyze (a minute or more later). Fresh statistics make every
    connection plan again. Autovacuum's own rule (10 % of the table) decides
    what is "much". The import has committed by now, so a failure here is
    logged, never the caller's error.
    """
    if db.is_sqlite or changed < STATISTICS_MIN_ROWS:
        return
    table = EligibleAccount.__tablename__
    try:
        async with db.transaction() as session:
            estimate = await session.scalar(
                text("SELECT reltuples FROM pg_class WHERE oid = CAST(:name AS regclass)"),
                {"name": table},
            )
            # reltuples is -1 for a table never analyzed.
            if changed >= STATISTICS_SHARE * max(float(estimate or 0), 0.0):
                await session.execute(text(f"ANALYZE {table}"))
    except Exception as exc:  # the import itself has succeeded
        log.warning("could not refresh the eligible list's statistics", error=str(exc))
