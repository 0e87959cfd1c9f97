"""ReportAccountUse: when an account is used on a device, bind it to the
device for every partner whose eligible list holds it; an account on no
list is bound to nothing.

At most one active binding per (partner, account) is enforced by a partial
unique index. New bindings are inserted with ON CONFLICT DO NOTHING on that
index: under concurrent reports the database makes one insert win and the
others see no row come back, look again and find the winner's binding (for
the refuse policy they answer BOUND_TO_OTHER_DEVICE). With the move policy
the reports of one account are serialized on its list entry's row lock, and
the old binding is revoked with a conditional UPDATE, so concurrent moves
still leave exactly one active binding.

This is the general path, on an ORM session, for every database. A
store may run a report faster first (binding/store_postgres.py) and hand
the partners it could not settle to `bind`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.binding.changes import BindingChanges
from tether.server.binding.tables import ACTIVE, REVOKED, Binding, EligibleAccount
from tether.server.errors import NotFound, Unavailable
from tether.server.shared.bindings import BindingChange, BindingListener
from tether.server.shared.digests import Digester
from tether.server.shared.partners import Partner
from tether.server.shared.subjects import Subject
from tether.server.storage import dialects
from tether.server.storage.base import utcnow

# Each lost race means another report committed; a handful of rounds is
# plenty because moves of one account are serialized on a row lock.
MAX_ROUNDS = 8


class Outcome(enum.StrEnum):
    BOUND = "bound"
    ALREADY_BOUND = "already_bound"
    NOT_ELIGIBLE = "not_eligible"
    BOUND_TO_OTHER_DEVICE = "bound_to_other_device"
    MOVED = "moved"


@dataclass(frozen=True)
class PartnerOutcome:
    partner_id: str
    outcome: Outcome
    # The binding to the reporting device (BOUND, ALREADY_BOUND, MOVED).
    binding: Binding | None = None


@dataclass(frozen=True)
class Entry:
    """The list entry that makes an account eligible with one partner."""

    entry_id: int
    partner_id: str
    reference: str
    policy: str


def entries_query() -> Select[int, str, str, str]:
    """The columns of an Entry: list entries with their partner's rebind
    policy (the caller says which accounts and partners)."""
    return select(
        EligibleAccount.entry_id,
        EligibleAccount.partner_id,
        EligibleAccount.partner_reference,
        Partner.rebind_policy,
    ).join(Partner, Partner.partner_id == EligibleAccount.partner_id)


@dataclass(frozen=True)
class Report:
    account: Subject
    device: Subject
    # Only these partners; empty: every partner whose list holds the account.
    partner_ids: Sequence[str] = ()


class Reporter:
    def __init__(self, digester: Digester, changes: BindingChanges) -> None:
        self.digester = digester
        self._changes = changes

    @property
    def listeners(self) -> tuple[BindingListener, ...]:
        """Who is told of each binding created or revoked, in order."""
        return self._changes.listeners

    async def report(self, session: AsyncSession, report: Report) -> list[PartnerOutcome]:
        named = sorted(set(report.partner_ids))
        if named:
            await require_partners(session, named)
        # Plain columns, not ORM entities: this runs on every report.
        query = (
            entries_query()
            .where(EligibleAccount.account_digest.in_(report.account.candidates(self.digester)))
            # The current key's entry first, should a rotation have left two.
            .order_by(EligibleAccount.partner_id, EligibleAccount.entry_id.desc())
        )
        if named:
            query = query.where(EligibleAccount.partner_id.in_(named))
        eligible: dict[str, Entry] = {}
        # On the session's connection: plain rows, without the ORM's execution layers.
        connection = await session.connection()
        for entry_id, partner_id, reference, policy in await connection.execute(query):
            eligible.setdefault(partner_id, Entry(entry_id, partner_id, reference, policy))

        outcomes = []
        # Sorted, so that two reports touching the same partners lock in one order.
        for partner_id in sorted(set(named) | set(eligible)):
            if partner_id not in eligible:
                outcomes.append(PartnerOutcome(partner_id, Outcome.NOT_ELIGIBLE))
                continue
            outcomes.append(await self.bind(session, report, eligible[partner_id]))
        return outcomes

    async def bind(
        self, session: AsyncSession, report: Report, entry: Entry, *, tried: bool = False
    ) -> PartnerOutcome:
        """tried: an insert of this report just met an active binding."""
        partner_id, policy = entry.partner_id, entry.policy
        accounts = report.account.candidates(self.digester)
        devices = set(report.device.candidates(self.digester))
        if policy == "move":
            # Serializes the reports of this account with this partner
            # (SQLite already runs one writer at a time).
            await session.execute(
                select(EligibleAccount.entry_id)
                .where(EligibleAccount.entry_id == entry.entry_id)
                .with_for_update()
            )
        # Insert first: a new binding, the common case, then costs one
        # statement. While keys rotate, an active binding may carry an older
        # key's digest that the index cannot see, so look first then.
        insert_first = len(accounts) == 1 and not tried
        for _ in range(MAX_ROUNDS):
            if insert_first:
                created = await self._create(session, report, entry)
                if created is not None:
                    return PartnerOutcome(partner_id, Outcome.BOUND, created)
            active = await session.scalar(
                select(Binding)
                .where(
                    Binding.partner_id == partner_id,
                    Binding.account_digest.in_(accounts),
                    Binding.state == ACTIVE,
                )
                .execution_options(populate_existing=True)
            )
            if active is None:
                if not insert_first:
                    created = await self._create(session, report, entry)
                    if created is not None:
                        return PartnerOutcome(partner_id, Outcome.BOUND, created)
                continue  # another report won or revoked meanwhile; look again
            if active.device_digest in devices:
                return PartnerOutcome(partner_id, Outcome.ALREADY_BOUND, active)
            if policy != "move":
                return PartnerOutcome(partner_id, Outcome.BOUND_TO_OTHER_DEVICE)
            revoked = await revoke(session, active.binding_id, "moved", self.listeners)
            if revoked is None:
                continue  # someone else revoked or moved it meanwhile
            created = await self._create(session, report, entry)
            if created is not None:
                return PartnerOutcome(partner_id, Outcome.MOVED, created)
        raise Unavailable(
            ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
            "too many concurrent reports of this account; retry",
            retry_after_seconds=0.1,
        )

    async def _create(self, session: AsyncSession, report: Report, entry: Entry) -> Binding | None:
        """The new active binding, or None when another one exists already."""
        values = {
            "binding_id": uuid.uuid4(),
            "partner_id": entry.partner_id,
            "account_kind": report.account.kind,
            "account_digest": report.account.digest(self.digester),
            "device_digest": report.device.digest(self.digester),
            "key_id": self.digester.current.key_id,
            # What goes back to the partner instead of the raw account.
            "partner_reference": entry.reference or str(entry.entry_id),
            "state": ACTIVE,
            "create_time": utcnow(),
            "revoke_time": None,
            "revoke_reason": None,
        }
        statement = (
            dialects.insert(session, Binding.__table__)
            .values(values)
            .on_conflict_do_nothing(
                index_elements=["partner_id", "account_digest"],
                # Literal, so that PostgreSQL infers the partial index.
                index_where=text("state = 'active'"),
            )
            .returning(Binding.binding_id)
        )
        # A Core insert: the ORM's unit of work costs more than the insert itself.
        connection = await session.connection()
        if await connection.scalar(statement) is None:
            return None
        created = Binding(**values)
        await _tell(session, self.listeners, BindingChange("created", created))
        return created


async def revoke(
    session: AsyncSession,
    binding_id: uuid.UUID,
    reason: str,
    listeners: Sequence[BindingListener],
) -> Binding | None:
    """Revokes an active binding; None if it was not active (any more)."""
    statement = (
        update(Binding)
        .where(Binding.binding_id == binding_id, Binding.state == ACTIVE)
        .values(state=REVOKED, revoke_time=utcnow(), revoke_reason=reason)
        .returning(Binding)
    )
    revoked = (
        await session.scalars(statement, execution_options={"populate_existing": True})
    ).one_or_none()
    if revoked is not None:
        await _tell(session, listeners, BindingChange("revoked", revoked, reason))
    return revoked


async def _tell(
    session: AsyncSession, listeners: Sequence[BindingListener], change: BindingChange
) -> None:
    for listener in listeners:
        await listener(session, change)


async def require_partners(session: AsyncSession, partner_ids: list[str]) -> None:
    known = set(
        await session.scalars(select(Partner.partner_id).where(Partner.partner_id.in_(partner_ids)))
    )
    missing = [p for p in partner_ids if p not in known]
    if missing:
        raise NotFound(
            ErrorReason.ERROR_REASON_PARTNER_NOT_FOUND,
            f"partner {missing[0]!r} not found",
            metadata={"partner_id": missing[0]},
        )
