"""Bulk import of an eligible list: staged as it streams in, merged at the end.

Entries are normalized and digested batch by batch and loaded into a
temporary staging table of the import's own transaction (COPY on
PostgreSQL, executemany on SQLite). Only when the stream ends does one
statement merge the staging table into the list (and, for REPLACE, one
statement delete what the stream did not name). A stream that fails or is
cancelled rolls the transaction back, so it changes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    MetaData,
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
from tether.server.admin.service import get_partner
from tether.server.binding import accounts, dialects
from tether.server.binding.eligible import MAX_REFERENCE
from tether.server.binding.tables import EligibleAccount
from tether.server.digests import Digester
from tether.server.errors import FieldViolation, InvalidArgument
from tether.server.storage.base import UtcDateTime, utcnow

MAX_REPORTED_REJECTIONS = 100

# (account kind or "" when unknown, value, region hint, partner reference)
RawEntry = tuple[str, str, str, str]
# (position in the stream, account kind, digest, partner reference)
StagedRow = tuple[int, str, bytes, str]
STAGING_COLUMNS = ["seq", "account_kind", "account_digest", "partner_reference"]


@dataclass(frozen=True)
class Rejection:
    index: int
    field: str
    description: str


@dataclass
class ImportResult:
    received: int = 0
    imported: int = 0
    rejected: int = 0
    removed: int = 0
    rejections: list[Rejection] = field(default_factory=list)


def prepare(
    digester: Digester, first_index: int, entries: Sequence[RawEntry]
) -> tuple[list[StagedRow], list[Rejection]]:
    """Normalizes and digests one batch: the hot loop of an import."""
    key = digester.current
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
    """One import stream, inside the caller's transaction."""

    def __init__(
        self,
        session: AsyncSession,
        digester: Digester,
        partner_id: str,
        *,
        replace: bool,
        max_rejected: int,
    ) -> None:
        self._session = session
        self._digester = digester
        self._partner_id = partner_id
        self._replace = replace
        self._max_rejected = max_rejected
        self._postgres = dialects.is_postgres(session)
        self._staging = _staging_table()
        self.result = ImportResult()

    async def start(self) -> None:
        await get_partner(self._session, self._partner_id)
        connection = await self._session.connection()
        await connection.run_sync(self._staging.create)

    async def add(self, entries: Sequence[RawEntry]) -> None:
        rows, rejections = prepare(self._digester, self.result.received, entries)
        self._note(len(entries), rejections)
        if rows:
            await self._load(rows)

    def _note(self, received: int, rejections: list[Rejection]) -> None:
        result = self.result
        result.received += received
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

    async def _load(self, rows: list[StagedRow]) -> None:
        if self._postgres:
            connection = await self._session.connection()
            raw = await connection.get_raw_connection()
            await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
                self._staging.name, records=rows, columns=STAGING_COLUMNS
            )
            return
        await self._session.execute(
            self._staging.insert(), [dict(zip(STAGING_COLUMNS, row, strict=True)) for row in rows]
        )

    async def finish(self) -> ImportResult:
        """Merges the staged entries into the list; the caller then commits."""
        session, staging = self._session, self._staging
        if self._postgres:
            # Temporary tables get no automatic statistics; the merge plans need them.
            await session.execute(text(f"ANALYZE {staging.name}"))
        else:
            # SQLite answers NOT EXISTS row by row; this makes each answer cheap.
            connection = await session.connection()
            await connection.run_sync(Index(None, staging.c.account_digest).create)
        if self._replace:
            removed = await session.execute(
                delete(EligibleAccount)
                .where(
                    EligibleAccount.partner_id == self._partner_id,
                    ~exists().where(staging.c.account_digest == EligibleAccount.account_digest),
                )
                .execution_options(synchronize_session=False)
            )
            self.result.removed = int(removed.rowcount)  # type: ignore[attr-defined]
        # The last entry for an account wins, as with AddEligibleAccounts.
        latest = select(func.max(staging.c.seq)).group_by(staging.c.account_digest)
        rows = select(
            literal(self._partner_id, String()),
            staging.c.account_kind,
            staging.c.account_digest,
            literal(self._digester.current.key_id, String()),
            staging.c.partner_reference,
            literal(utcnow(), UtcDateTime()),
        ).where(staging.c.seq.in_(latest))
        merge = dialects.insert(session, EligibleAccount).from_select(
            [
                "partner_id",
                "account_kind",
                "account_digest",
                "key_id",
                "partner_reference",
                "create_time",
            ],
            rows,
        )
        merge = merge.on_conflict_do_update(
            index_elements=["partner_id", "account_digest"],
            set_={"partner_reference": merge.excluded.partner_reference},
            where=EligibleAccount.partner_reference != merge.excluded.partner_reference,
        )
        await session.execute(merge)
        counted = select(func.count(distinct(staging.c.account_digest)))
        self.result.imported = int(await session.scalar(counted) or 0)
        if not self._postgres:
            connection = await session.connection()
            await connection.run_sync(staging.drop)
        return self.result


def _staging_table() -> Table:
    """A temporary table of the import's own, gone with its transaction."""
    return Table(
        f"import_staging_{secrets.token_hex(6)}",
        MetaData(),
        Column("seq", BigInteger, nullable=False),
        Column("account_kind", String(16), nullable=False),
        Column("account_digest", LargeBinary, nullable=False),
        Column("partner_reference", String(MAX_REFERENCE), nullable=False),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )
