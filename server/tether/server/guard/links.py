"""The links between identities and accounts: which accounts an identity
was counted for, and the reverse."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.guard.tables import GuardLink

Cursor = list[Any]


def _cursor(row: GuardLink) -> Cursor:
    return [row.last_seen_time.isoformat(), row.service_id, row.identity, row.account_digest.hex()]


def _page(query: Select[Any], service_id: str, after: Cursor | None) -> Any:
    if service_id:
        query = query.where(GuardLink.service_id == service_id)
    if after is not None:
        seen, service, identity, digest = after
        query = query.where(
            tuple_(
                GuardLink.last_seen_time,
                GuardLink.service_id,
                GuardLink.identity,
                GuardLink.account_digest,
            )
            < tuple_(datetime.fromisoformat(seen), service, identity, bytes.fromhex(digest))
        )
    return query.order_by(
        GuardLink.last_seen_time.desc(),
        GuardLink.service_id.desc(),
        GuardLink.identity.desc(),
        GuardLink.account_digest.desc(),
    )


async def identity_accounts(
    session: AsyncSession,
    identities: list[str],
    service_id: str,
    after: Cursor | None,
    limit: int,
) -> tuple[list[GuardLink], Cursor | None]:
    """Links of any of `identities` (an identity and those it joined)."""
    query = _page(select(GuardLink).where(GuardLink.identity.in_(identities)), service_id, after)
    return await _run(session, query, limit)


async def account_identities(
    session: AsyncSession,
    digests: list[bytes],
    service_id: str,
    after: Cursor | None,
    limit: int,
) -> tuple[list[GuardLink], Cursor | None]:
    query = _page(select(GuardLink).where(GuardLink.account_digest.in_(digests)), service_id, after)
    return await _run(session, query, limit)


async def _run(
    session: AsyncSession, query: Any, limit: int
) -> tuple[list[GuardLink], Cursor | None]:
    rows = list(await session.scalars(query.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (_cursor(rows[-1]) if more else None)
