"""Partners' lists of accounts eligible for binding: add, remove, list.

Bulk loads go through importer.py; this module handles the small calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.binding.tables import EligibleAccount
from tether.server.errors import Violations
from tether.server.shared.digests import Digester
from tether.server.shared.partners import get_partner
from tether.server.shared.subjects import Subject
from tether.server.storage import dialects
from tether.server.storage.base import utcnow
from tether.server.validation import check_text

MAX_REFERENCE = 128


@dataclass(frozen=True)
class Entry:
    account: Subject
    # The partner's own id for the account; "" if none.
    reference: str = ""


def check_reference(value: str, path: str, violations: Violations) -> None:
    check_text(value, path, violations, max_len=MAX_REFERENCE)
    if "\n" in value or "\t" in value:
        violations.add(path, "a single line of printable characters")


@dataclass(frozen=True)
class AddResult:
    added: int
    updated: int


async def add(
    session: AsyncSession, digester: Digester, partner_id: str, entries: Sequence[Entry]
) -> AddResult:
    await get_partner(session, partner_id)
    # A later entry for the same account wins, as in an import.
    rows = {e.account.digest(digester): e for e in entries}
    existing = set(
        await session.scalars(
            select(EligibleAccount.account_digest).where(
                EligibleAccount.partner_id == partner_id,
                EligibleAccount.account_digest.in_(list(rows)),
            )
        )
    )
    now = utcnow()
    statement = dialects.insert(session, EligibleAccount).values(
        [
            {
                "partner_id": partner_id,
                "account_kind": e.account.kind,
                "account_digest": digest,
                "key_id": digester.current.key_id,
                "partner_reference": e.reference,
                "create_time": now,
            }
            for digest, e in rows.items()
        ]
    )
    statement = statement.on_conflict_do_update(
        index_elements=["partner_id", "account_digest"],
        set_={"partner_reference": statement.excluded.partner_reference},
    )
    await session.execute(statement)
    return AddResult(added=len(rows) - len(existing), updated=len(existing))


async def remove(
    session: AsyncSession, digester: Digester, partner_id: str, accounts: Sequence[Subject]
) -> int:
    await get_partner(session, partner_id)
    digests = [d for a in accounts for d in a.candidates(digester)]
    result = await session.execute(
        delete(EligibleAccount).where(
            EligibleAccount.partner_id == partner_id,
            EligibleAccount.account_digest.in_(digests),
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def list_entries(
    session: AsyncSession, partner_id: str, after: int | None, limit: int
) -> list[EligibleAccount]:
    await get_partner(session, partner_id)
    query = (
        select(EligibleAccount)
        .where(EligibleAccount.partner_id == partner_id)
        .order_by(EligibleAccount.entry_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(EligibleAccount.entry_id > after)
    return list(await session.scalars(query))
