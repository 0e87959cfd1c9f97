"""ReportAccountUse: bind an account to a device for every partner whose
eligible list holds it (document A, steps 1-2).

At most one active binding per (partner, account) is enforced by a partial
unique index. New bindings are inserted with ON CONFLICT DO NOTHING on that
index: under concurrent reports the database makes one insert win and the
others see no row come back, look again and find the winner's binding (for
the refuse policy they answer BOUND_TO_OTHER_DEVICE). With the move policy
the reports of one account are serialized on its list entry's row lock, and
the old binding is revoked with a conditional UPDATE, so concurrent moves
still leave exactly one active binding.

On PostgreSQL, with one digest key and listeners that can write in SQL
(provisioning's outbox can), a report first tries everything in one
statement: look the account up on the lists, insert a binding per partner
(INSERT ... SELECT ... ON CONFLICT DO NOTHING) and every listener's rows for
those bindings (data-modifying CTEs). A new account, the common case, then
costs one round trip. Partners whose insert met an active binding go on the
general path below, in the same transaction. Reports that name no
partners try that statement first on a bare asyncpg connection
(report_direct: no ORM session, no SQLAlchemy connection), falling back to
all of this when a binding exists already.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ARRAY,
    LargeBinary,
    String,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.admin.tables import Partner
from tether.server.shared.bindings import BindingChange, BindingListener, SqlBindingListener
from tether.server.shared.subjects import Subject
from tether.server.binding.tables import ACTIVE, REVOKED, Binding, EligibleAccount
from tether.server.shared.digests import Digester
from tether.server.errors import NotFound, Unavailable
from tether.server.storage import dialects
from tether.server.storage.base import UtcDateTime, utcnow
from tether.server.storage.compiled import CompiledStatement, DriverConnection
from tether.server.storage.idempotency import Fallback

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
class _Entry:
    """The list entry that makes an account eligible with one partner."""

    entry_id: int
    partner_id: str
    reference: str
    policy: str


@dataclass(frozen=True)
class Report:
    account: Subject
    device: Subject
    # Only these partners; empty: every partner whose list holds the account.
    partner_ids: Sequence[str] = ()


class Reporter:
    def __init__(self, digester: Digester, listeners: Sequence[BindingListener]) -> None:
        self._digester = digester
        self._listeners = listeners
        # The one-statement report, per (listeners, partners named or not).
        self._fused: dict[tuple[tuple[SqlBindingListener, ...], bool], CompiledStatement] = {}
        # Whether every listener writes in SQL, checked once per set of listeners.
        self._checked: tuple[BindingListener, ...] | None = None
        self._all_sql: list[SqlBindingListener] | None = None

    async def report(self, session: AsyncSession, report: Report) -> list[PartnerOutcome]:
        named = sorted(set(report.partner_ids))
        if named:
            await _require_partners(session, named)
        sql_listeners = self._sql_listeners
        if (
            sql_listeners is not None
            and len(self._digester.keys) == 1
            and dialects.is_postgres(session)
        ):
            return await self._report_fused(session, report, named, sql_listeners)
        # Plain columns, not ORM entities: this runs on every report.
        query = (
            select(
                EligibleAccount.entry_id,
                EligibleAccount.partner_id,
                EligibleAccount.partner_reference,
                Partner.rebind_policy,
            )
            .join(Partner, Partner.partner_id == EligibleAccount.partner_id)
            .where(EligibleAccount.account_digest.in_(report.account.candidates(self._digester)))
            # The current key's entry first, should a rotation have left two.
            .order_by(EligibleAccount.partner_id, EligibleAccount.entry_id.desc())
        )
        if named:
            query = query.where(EligibleAccount.partner_id.in_(named))
        eligible: dict[str, _Entry] = {}
        # On the session's connection: plain rows, without the ORM's execution layers.
        connection = await session.connection()
        for entry_id, partner_id, reference, policy in await connection.execute(query):
            eligible.setdefault(partner_id, _Entry(entry_id, partner_id, reference, policy))

        outcomes = []
        # Sorted, so that two reports touching the same partners lock in one order.
        for partner_id in sorted(set(named) | set(eligible)):
            if partner_id not in eligible:
                outcomes.append(PartnerOutcome(partner_id, Outcome.NOT_ELIGIBLE))
                continue
            outcomes.append(await self._bind(session, report, eligible[partner_id]))
        return outcomes

    async def _report_fused(
        self,
        session: AsyncSession,
        report: Report,
        named: list[str],
        listeners: list[SqlBindingListener],
    ) -> list[PartnerOutcome]:
        connection = await session.connection()
        inserted = await self._insert_fused(
            connection, connection.dialect, report, named, listeners
        )
        outcomes = {p: PartnerOutcome(p, Outcome.NOT_ELIGIBLE) for p in named}
        for entry, created, markers in inserted:
            if created is None:
                # An active binding exists: the general path decides.
                outcomes[entry.partner_id] = await self._bind(session, report, entry, tried=True)
                continue
            for listener, marker in zip(listeners, markers, strict=True):
                await listener.created_done(session, created, marker)
            outcomes[entry.partner_id] = PartnerOutcome(entry.partner_id, Outcome.BOUND, created)
        return [outcomes[p] for p in sorted(outcomes)]

    async def _insert_fused(
        self,
        connection: AsyncConnection | DriverConnection,
        dialect: Dialect,
        report: Report,
        named: list[str],
        listeners: list[SqlBindingListener],
    ) -> list[tuple[_Entry, Binding | None, tuple[Any, ...]]]:
        """Runs the one-statement report: per partner listing the account,
        its entry, the binding inserted (None: an active one exists) and
        the listeners' markers for it."""
        statement = self._fused_statement(dialect, listeners, bool(named))
        account = report.account.digest(self._digester)
        device = report.device.digest(self._digester)
        key_id = self._digester.current.key_id
        now = utcnow()
        rows = await statement.rows(
            connection,
            account=account,
            account_kind=report.account.kind,
            device=device,
            key_id=key_id,
            now=now,
            named=named,
        )
        inserted = []
        for row in rows:
            entry_id, partner_id, reference, policy, binding_id, bound_reference, *markers = row
            created = None
            if binding_id is not None:
                created = Binding(
                    binding_id=uuid.UUID(bytes=binding_id.bytes),
                    partner_id=partner_id,
                    account_kind=report.account.kind,
                    account_digest=account,
                    device_digest=device,
                    key_id=key_id,
                    partner_reference=bound_reference,
                    state=ACTIVE,
                    create_time=now,
                    revoke_time=None,
                    revoke_reason=None,
                )
            entry = _Entry(entry_id, partner_id, reference, policy)
            inserted.append((entry, created, tuple(markers)))
        return inserted

    @property
    def _sql_listeners(self) -> list[SqlBindingListener] | None:
        """The listeners, if all can write in SQL (a protocol check is slow)."""
        current = tuple(self._listeners)
        if current != self._checked:
            sql = [x for x in current if isinstance(x, SqlBindingListener)]
            self._all_sql = sql if len(sql) == len(current) else None
            self._checked = current
        return self._all_sql

    def runs_direct(self, report: Report, postgres: bool) -> bool:
        """Whether report_direct can try this report (it may still fall back)."""
        return (
            postgres
            and not report.partner_ids
            and len(self._digester.keys) == 1
            and self._sql_listeners is not None
        )

    async def report_direct(
        self, connection: DriverConnection, dialect: Dialect, report: Report
    ) -> tuple[list[PartnerOutcome], Callable[[], None]]:
        """The one-statement report on a bare asyncpg connection, in its
        transaction (no ORM session, no SQLAlchemy connection).

        For new bindings only, the common case: the outcomes, and what to
        run once the transaction has committed (the listeners' wake-ups).
        Raises Fallback when an active binding exists for some partner; the
        caller then rolls back and runs report() on a session.
        """
        listeners = self._sql_listeners
        assert listeners is not None
        inserted = await self._insert_fused(connection, dialect, report, [], listeners)
        if any(created is None for _, created, _ in inserted):
            raise Fallback
        outcomes = [
            PartnerOutcome(entry.partner_id, Outcome.BOUND, created)
            for entry, created, _ in inserted
        ]

        def committed() -> None:
            for _, created, markers in inserted:
                assert created is not None
                for listener, marker in zip(listeners, markers, strict=True):
                    listener.created_committed(created, marker)

        return outcomes, committed

    def _fused_statement(
        self, dialect: Dialect, listeners: list[SqlBindingListener], named: bool
    ) -> CompiledStatement:
        key = (tuple(listeners), named)
        statement = self._fused.get(key)
        if statement is None:
            statement = CompiledStatement(_fused_report(listeners, named), dialect)
            self._fused[key] = statement
        return statement

    async def _bind(
        self, session: AsyncSession, report: Report, entry: _Entry, *, tried: bool = False
    ) -> PartnerOutcome:
        """tried: an insert of this report just met an active binding."""
        partner_id, policy = entry.partner_id, entry.policy
        accounts = report.account.candidates(self._digester)
        devices = set(report.device.candidates(self._digester))
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
            revoked = await revoke(session, active.binding_id, "moved", self._listeners)
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

    async def _create(self, session: AsyncSession, report: Report, entry: _Entry) -> Binding | None:
        """The new active binding, or None when another one exists already."""
        values = {
            "binding_id": uuid.uuid4(),
            "partner_id": entry.partner_id,
            "account_kind": report.account.kind,
            "account_digest": report.account.digest(self._digester),
            "device_digest": report.device.digest(self._digester),
            "key_id": self._digester.current.key_id,
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
        await _tell(session, self._listeners, BindingChange("created", created))
        return created


def _fused_report(listeners: Sequence[SqlBindingListener], named: bool) -> Any:
    """The one-statement report (PostgreSQL, one digest key).

    Per partner whose list holds the account (only those named, if any):
    its entry, and the binding inserted for it with every listener's rows,
    or a NULL binding when an active one exists already.
    """
    bindings = Binding.__table__
    account = bindparam("account", type_=LargeBinary)
    entries = (
        select(
            EligibleAccount.entry_id,
            EligibleAccount.partner_id,
            EligibleAccount.partner_reference,
            Partner.rebind_policy,
        )
        .join(Partner, Partner.partner_id == EligibleAccount.partner_id)
        .where(EligibleAccount.account_digest == account)
    )
    if named:
        entries = entries.where(
            EligibleAccount.partner_id == any_(bindparam("named", type_=ARRAY(String)))
        )
    listed = entries.cte("listed")
    insert = postgresql.insert(Binding).from_select(
        [
            "binding_id",
            "partner_id",
            "account_kind",
            "account_digest",
            "device_digest",
            "key_id",
            "partner_reference",
            "state",
            "create_time",
        ],
        select(
            func.gen_random_uuid(),
            listed.c.partner_id,
            bindparam("account_kind", type_=String),
            account,
            bindparam("device", type_=LargeBinary),
            bindparam("key_id", type_=String),
            # What goes back to the partner instead of the raw account.
            case(
                (listed.c.partner_reference == "", cast(listed.c.entry_id, String)),
                else_=listed.c.partner_reference,
            ),
            literal(ACTIVE),
            bindparam("now", type_=UtcDateTime),
        ).order_by(listed.c.partner_id),
    )
    created = (
        insert.on_conflict_do_nothing(
            index_elements=["partner_id", "account_digest"],
            index_where=text("state = 'active'"),
        )
        .returning(*bindings.c)
        .cte("created")
    )
    writes = [listener.created_writes(created) for listener in listeners]
    return (
        select(
            listed.c.entry_id,
            listed.c.partner_id,
            listed.c.partner_reference,
            listed.c.rebind_policy,
            created.c.binding_id,
            created.c.partner_reference.label("bound_reference"),
            *(w.marker.label(f"marker_{i}") for i, w in enumerate(writes)),
        )
        .select_from(listed.outerjoin(created, created.c.partner_id == listed.c.partner_id))
        .order_by(listed.c.partner_id)
        .add_cte(*(cte for w in writes for cte in w.ctes))
    )


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


async def _require_partners(session: AsyncSession, partner_ids: list[str]) -> None:
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
