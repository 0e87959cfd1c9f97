"""The binding store on PostgreSQL.

Reports. With one digest key and listeners that can write in SQL
(provisioning's outbox can), a report first tries everything in one
statement: look the account up on the lists, insert a binding per partner
(INSERT ... SELECT ... ON CONFLICT DO NOTHING) and every listener's rows for
those bindings (data-modifying CTEs). A new account, the common case, then
costs one round trip. Partners whose insert met an active binding go on the
general path (Reporter.bind), in the same transaction. Reports that name no
partners try that statement on a bare asyncpg connection first (no ORM
session, no SQLAlchemy connection: Once.run_direct), falling back to all
of this on a session when a binding exists already.

Imports. Batches load into the temporary tables with COPY. A batch whose
accounts are all new (a first import, the common case) is instead copied
straight into the list, about twice as fast as the merge: that COPY runs
under a savepoint, and if an account turns out to be listed already, it is
undone and the stream goes on with the merge. The temporary tables drop
themselves at commit.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from sqlalchemy import (
    ARRAY,
    LargeBinary,
    String,
    Table,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from tether.server import logs
from tether.server.binding.reports import (
    Entry,
    Outcome,
    PartnerOutcome,
    Report,
    Reporter,
    entries_query,
    require_partners,
)
from tether.server.binding.store import (
    LIST_COLUMNS,
    STAGING_COLUMNS,
    ListImport,
    Response,
    StagedRow,
)
from tether.server.binding.store_sqlalchemy import SqlAlchemyBindingStore, SqlAlchemyListImport
from tether.server.binding.tables import ACTIVE, Binding, EligibleAccount
from tether.server.observability import propagation
from tether.server.shared.bindings import BindingListener, SqlBindingListener
from tether.server.shared.digests import DigestKey
from tether.server.storage.base import UtcDateTime, utcnow
from tether.server.storage.compiled import CompiledStatement, DriverConnection
from tether.server.storage.database import Database
from tether.server.storage.idempotency import Fallback, Once

log = logs.get(__name__)

# One report's inserts: per partner listing the account, its entry, the
# binding inserted (None: an active one exists) and the listeners' markers.
Inserted = list[tuple[Entry, Binding | None, tuple[Any, ...]]]


class PostgresBindingStore(SqlAlchemyBindingStore):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        # The one-statement report, per (listeners, partners named or not).
        self._fused: dict[tuple[tuple[SqlBindingListener, ...], bool], CompiledStatement] = {}
        # Whether every listener writes in SQL, checked once per set of listeners.
        self._checked: tuple[BindingListener, ...] | None = None
        self._all_sql: list[SqlBindingListener] | None = None
        # The report's traceparent for what listeners write (None: not traced).
        self._trace_parent = propagation.traceparent_source()

    async def report(
        self,
        once: Once[Response],
        reporter: Reporter,
        report: Report,
        *,
        settle: Callable[[], Awaitable[None]],
        respond: Callable[[list[PartnerOutcome]], Response],
    ) -> Response:
        listeners = self._sql_listeners(reporter.listeners)
        if listeners is None or len(reporter.digester.keys) != 1:
            return await super().report(once, reporter, report, settle=settle, respond=respond)

        async def work(session: AsyncSession) -> Response:
            try:
                outcomes = await self._report_fused(session, reporter, report, listeners)
            finally:
                await settle()
            return respond(outcomes)

        if report.partner_ids:
            return await once.run(work)

        async def direct(connection: DriverConnection) -> tuple[Response, Callable[[], None]]:
            try:
                outcomes, committed = await self._report_direct(
                    connection, reporter, report, listeners
                )
            finally:
                # Also before falling back: a limited call goes no further.
                await settle()
            return respond(outcomes), committed

        # The common case (new bindings) without an ORM session; anything
        # else goes the general way.
        return await once.run_direct(direct, general=lambda: once.run(work))

    def _sql_listeners(
        self, listeners: tuple[BindingListener, ...]
    ) -> list[SqlBindingListener] | None:
        """The listeners, if all can write in SQL (a protocol check is slow)."""
        if listeners != self._checked:
            sql = [x for x in listeners if isinstance(x, SqlBindingListener)]
            self._all_sql = sql if len(sql) == len(listeners) else None
            self._checked = listeners
        return self._all_sql

    async def _report_fused(
        self,
        session: AsyncSession,
        reporter: Reporter,
        report: Report,
        listeners: list[SqlBindingListener],
    ) -> list[PartnerOutcome]:
        named = sorted(set(report.partner_ids))
        if named:
            await require_partners(session, named)
        connection = await session.connection()
        inserted = await self._insert_fused(
            connection, connection.dialect, reporter, report, named=named, listeners=listeners
        )
        outcomes = {p: PartnerOutcome(p, Outcome.NOT_ELIGIBLE) for p in named}
        for entry, created, markers in inserted:
            if created is None:
                # An active binding exists: the general path decides.
                outcomes[entry.partner_id] = await reporter.bind(session, report, entry, tried=True)
                continue
            for listener, marker in zip(listeners, markers, strict=True):
                await listener.created_done(session, created, marker)
            outcomes[entry.partner_id] = PartnerOutcome(entry.partner_id, Outcome.BOUND, created)
        return [outcomes[p] for p in sorted(outcomes)]

    async def _report_direct(
        self,
        connection: DriverConnection,
        reporter: Reporter,
        report: Report,
        listeners: list[SqlBindingListener],
    ) -> tuple[list[PartnerOutcome], Callable[[], None]]:
        """The one-statement report on a bare asyncpg connection, in its
        transaction (no ORM session, no SQLAlchemy connection).

        For new bindings only, the common case: the outcomes, and what to
        run once the transaction has committed (the listeners' wake-ups).
        Raises Fallback when an active binding exists for some partner; the
        caller then rolls back and runs the report on a session.
        """
        dialect = self._db.engine.dialect
        inserted = await self._insert_fused(
            connection, dialect, reporter, report, named=[], listeners=listeners
        )
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

    async def _insert_fused(
        self,
        connection: AsyncConnection | DriverConnection,
        dialect: Dialect,
        reporter: Reporter,
        report: Report,
        *,
        named: list[str],
        listeners: list[SqlBindingListener],
    ) -> Inserted:
        """Runs the one-statement report."""
        statement = self._fused_statement(dialect, listeners, bool(named))
        digester = reporter.digester
        account = report.account.digest(digester)
        device = report.device.digest(digester)
        key_id = digester.current.key_id
        now = utcnow()
        rows = await statement.rows(
            connection,
            account=account,
            account_kind=report.account.kind,
            device=device,
            key_id=key_id,
            now=now,
            named=named,
            trace_parent=self._trace_parent() if self._trace_parent is not None else "",
        )
        inserted: Inserted = []
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
            entry = Entry(entry_id, partner_id, reference, policy)
            inserted.append((entry, created, tuple(markers)))
        return inserted

    def _fused_statement(
        self, dialect: Dialect, listeners: list[SqlBindingListener], named: bool
    ) -> CompiledStatement:
        key = (tuple(listeners), named)
        statement = self._fused.get(key)
        if statement is None:
            statement = CompiledStatement(_fused_report(listeners, named), dialect)
            self._fused[key] = statement
        return statement

    def list_import(self, session: AsyncSession, partner_id: str, key: DigestKey) -> ListImport:
        return PostgresListImport(session, partner_id, key)

    async def refresh_list_statistics(self, changed: int) -> None:
        """ANALYZE the eligible list after an import that changed much of it.

        PostgreSQL connections keep the plans they made while the list was
        small: a sequential scan chosen for a nearly empty list would stay,
        and every report would read the whole list of millions, until
        autovacuum's next analyze (a minute or more later). Fresh statistics
        make every connection plan again. Autovacuum's own rule (10 % of the
        table) decides what is "much". The import has committed by now, so a
        failure here is logged, never the caller's error.
        """
        if changed < STATISTICS_MIN_ROWS:
            return
        table = EligibleAccount.__tablename__
        try:
            async with self._db.transaction() as session:
                estimate = await session.scalar(
                    text("SELECT reltuples FROM pg_class WHERE oid = CAST(:name AS regclass)"),
                    {"name": table},
                )
                # reltuples is -1 for a table never analyzed.
                if changed >= STATISTICS_SHARE * max(float(estimate or 0), 0.0):
                    await session.execute(text(f"ANALYZE {table}"))
        except Exception as exc:  # the import itself has succeeded
            log.warning("could not refresh the eligible list's statistics", error=str(exc))


# An import that changes at least this share of the list (and this many
# entries) has the list's planner statistics taken at once, after it commits.
STATISTICS_SHARE = 0.1
STATISTICS_MIN_ROWS = 1_000


class PostgresListImport(SqlAlchemyListImport):
    def __init__(self, session: AsyncSession, partner_id: str, key: DigestKey) -> None:
        super().__init__(session, partner_id, key)
        # Copy batches straight into the list until one meets a listed account.
        self._direct = True
        # Rows copied straight in: distinct accounts, the unique index saw to it.
        self._copied = 0

    async def start(self) -> None:
        await super().start()
        # Sorting a batch by digest and REPLACE's anti-join stay in memory.
        await self._session.execute(text("SET LOCAL work_mem = '64MB'"))

    async def write(self, rows: list[StagedRow]) -> None:
        if self._direct and await self._copy_into_list(rows):
            self._copied += len(rows)
            await self._load(self._staging, rows)
            return
        await self._merge(rows)

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
        await self._copy(table.name, rows, STAGING_COLUMNS)

    async def _before_replace(self) -> None:
        # Temporary tables get no automatic statistics; the anti-join needs them.
        await self._session.execute(text(f"ANALYZE {self._staging.name}"))

    async def _imported(self) -> int:
        if self._direct:
            # Every batch went straight in, so no account came twice: skip the count.
            return self._copied
        return await super()._imported()

    async def _drop_temporary(self) -> None:
        return  # ON COMMIT DROP


def _fused_report(listeners: Sequence[SqlBindingListener], named: bool) -> Any:
    """The one-statement report (one digest key).

    Per partner whose list holds the account (only those named, if any):
    its entry, and the binding inserted for it with every listener's rows,
    or a NULL binding when an active one exists already.
    """
    bindings = Binding.__table__
    account = bindparam("account", type_=LargeBinary)
    entries = entries_query().where(EligibleAccount.account_digest == account)
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
