"""The PostgreSQL store's deliveries (`provisioning.store_postgres`) write
exactly what the SQLAlchemy store's general path (`leasing`,
`confirmations.decide`, `entitlement_feed`) writes, both on PostgreSQL: the
same outcomes, instruction rows, entitlements and feed events, for each
kind of result."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from tests.support import RunningServer
from tether.server.admin import service as admin
from tether.server.binding.tables import Binding
from tether.server.provisioning import confirmations, leasing
from tether.server.provisioning.outbox import BindingOutbox
from tether.server.provisioning.store_postgres import PostgresBroadcast, PostgresDelivery
from tether.server.provisioning.store_sqlalchemy import SqlAlchemyDelivery
from tether.server.provisioning.wakeup import Wakeup
from tether.server.shared import digests
from tether.server.shared.bindings import BindingChange
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database

TIMING = leasing.Timing(
    ack_deadline=30, backoff_factor=2, max_backoff=600, retry_delay=5, max_attempts=3
)
# Columns that differ between two bindings whatever path wrote them.
OWN = {
    "seq",
    "partner_id",
    "instruction_id",
    "binding_id",
    "partner_reference",
    "account_digest",
    "device_digest",
    "lease_owner",
    "due_time",
    "create_time",
    "update_time",
    "event_time",
}


@pytest.fixture
def db(pg_server: RunningServer) -> Database:
    """The migrated database of the PostgreSQL test server."""
    return pg_server.app.runtime.db


async def _partner(db: Database) -> str:
    partner_id = "pg-" + secrets.token_hex(4)
    async with db.transaction() as session:
        await admin.create_partner(session, partner_id, "Partner", "refuse")
        await admin.create_service(session, partner_id, "free-data", "Free data", "")
        await admin.create_service(session, partner_id, "roaming", "Roaming", "")
    return partner_id


async def _bind(db: Database, notify: Wakeup, partner_id: str) -> uuid.UUID:
    digester = digests.Digester(digests.parse_keys(digests.new_key_spec("t")))
    binding_id = uuid.uuid4()
    async with db.transaction() as session:
        binding = Binding(
            binding_id=binding_id,
            partner_id=partner_id,
            account_kind="member_id",
            account_digest=digester.digest("member_id", binding_id.hex),
            device_digest=digester.digest("serial_number", binding_id.hex),
            key_id=digester.current.key_id,
            partner_reference=binding_id.hex[:12],
            state="active",
            create_time=utcnow(),
        )
        session.add(binding)
        await session.flush()
        await BindingOutbox(notify).on_change(session, BindingChange("created", binding))
    return binding_id


async def _rows(db: Database, binding_id: uuid.UUID) -> dict[str, list[dict[str, Any]]]:
    found = {}
    async with db.sessions() as session:
        for table, order in (
            ("provisioning_instructions", "service_id"),
            ("entitlements", "service_id"),
            ("entitlement_events", "position"),
        ):
            rows = await session.execute(
                text(f"SELECT * FROM {table} WHERE binding_id = :b ORDER BY {order}"),
                {"b": binding_id},
            )
            found[table] = [{k: v for k, v in row._mapping.items() if k not in OWN} for row in rows]
    return found


@pytest.mark.parametrize(
    "results",
    [
        (confirmations.Done("ref-1"), confirmations.Failed(retryable=False, reason="no")),
        (confirmations.Failed(retryable=True, reason="later"), confirmations.Done("")),
    ],
)
async def test_hot_path_writes_what_the_general_path_writes(
    db: Database, results: tuple[confirmations.Result, ...]
) -> None:
    notify = Wakeup(PostgresBroadcast(db.url))
    general, fast = await _partner(db), await _partner(db)
    general_binding = await _bind(db, notify, general)
    fast_binding = await _bind(db, notify, fast)
    general_delivery = SqlAlchemyDelivery(db, notify, TIMING)
    delivery = PostgresDelivery(db, notify, TIMING)
    try:
        leased = await general_delivery.lease(general, owners=["g"] * 10, now=utcnow())
        fast_leased = await delivery.lease(fast, owners=["f"] * 10, now=utcnow())
        assert [(d.service_id, d.attempts, d.state) for d in leased] == [
            (d.service_id, d.attempts, d.state) for d in fast_leased
        ]
        assert await delivery.next_due(fast) == min(d.due_time for d in fast_leased)
        # Each result twice: the second is a duplicate (or, after a retry,
        # a first result), and an unknown instruction is refused.
        unknown = uuid.uuid4()
        items = [(d.instruction_id, r) for d, r in zip(leased, results, strict=True)]
        fast_items = [(d.instruction_id, r) for d, r in zip(fast_leased, results, strict=True)]
        for _ in range(2):
            applied = await general_delivery.confirm(
                general, [*items, (unknown, confirmations.Done())]
            )
            fast_applied = await delivery.confirm(
                fast, [*fast_items, (unknown, confirmations.Done())]
            )
            assert [(a.outcome, a.state, a.error and a.error.reason) for a in applied] == [
                (a.outcome, a.state, a.error and a.error.reason) for a in fast_applied
            ]
        assert await _rows(db, general_binding) == await _rows(db, fast_binding)
    finally:
        await delivery.close()


async def test_one_lease_hands_each_owner_its_slots_in_delivery_order(db: Database) -> None:
    notify = Wakeup(PostgresBroadcast(db.url))
    partner_id = await _partner(db)
    await _bind(db, notify, partner_id)
    await _bind(db, notify, partner_id)  # four instructions: two services each
    delivery = PostgresDelivery(db, notify, TIMING)
    try:
        leased = await delivery.lease(partner_id, owners=["a", "b", "a"], now=utcnow())
        assert [d.lease_owner for d in leased] == ["a", "b", "a"]
        assert [d.seq for d in leased] == sorted(d.seq for d in leased)
        (last,) = await delivery.lease(partner_id, owners=["b", "b"], now=utcnow())
        assert last.lease_owner == "b" and last.seq > leased[-1].seq
        assert await delivery.lease(partner_id, owners=["a"], now=utcnow()) == []
    finally:
        await delivery.close()
