"""Usage of services on devices: events reported by devices and partners,
the partner's last live answer, and aggregated queries."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors
from tether.server.errors import Violations
from tether.server.provisioning import entitlements
from tether.server.provisioning.tables import UsageAnswer, UsageRecord
from tether.server.shared.bindings import BindingFacts, BindingReader
from tether.server.storage.base import utcnow
from tether.server.transport.principal import CallerKind, Principal

_S = TypeVar("_S", bound=Select)  # type: ignore[type-arg]

METRIC = re.compile(r"^[a-z0-9_.]{1,63}\Z")
MAX_EVENTS = 1000
# Sums of reported quantities larger than an int64 are answered as this.
MAX_QUANTITY_SUM = 2**63 - 1
MAX_FUTURE = timedelta(minutes=5)
MAX_RANGE = timedelta(days=366)
MAX_PERIOD = 100


@dataclass(frozen=True)
class Event:
    occur_time: datetime
    metric: str
    quantity: int


def check_metric(metric: str, quantity: int, path: str, violations: Violations) -> None:
    if not METRIC.match(metric):
        violations.add(f"{path}.metric", "1-63 characters of a-z, 0-9, '_' and '.'")
    if quantity < 0:
        violations.add(f"{path}.quantity", "0 or more")


def check_events(events: list[Event], path: str, violations: Violations) -> None:
    if not 1 <= len(events) <= MAX_EVENTS:
        violations.add(path, f"1-{MAX_EVENTS} events")
    latest = utcnow() + MAX_FUTURE
    for i, e in enumerate(events):
        check_metric(e.metric, e.quantity, f"{path}[{i}].figure", violations)
        if e.occur_time > latest:
            violations.add(f"{path}[{i}].occur_time", "more than 5 minutes in the future")


@dataclass(frozen=True)
class Report:
    """Usage a device or partner reports for one service of one binding."""

    # None when the request's binding_id was not a UUID (reported by check).
    binding_id: uuid.UUID | None
    service_id: str
    events: list[Event]

    def check(self, path: str, violations: Violations) -> None:
        """Adds the report's bad fields; binding_id was parsed (and its
        violation added) when the report was made."""
        if not self.service_id:
            violations.add(f"{path}.service_id", "required")
        check_events(self.events, f"{path}.events", violations)


def check_scope(binding: BindingFacts, caller: Principal, device: list[bytes]) -> None:
    """A partner sees only its bindings; a device only the ones of the device it names."""
    if caller.kind is CallerKind.PARTNER and binding.partner_id != caller.partner_id:
        raise errors.NotFound(
            ErrorReason.ERROR_REASON_BINDING_NOT_FOUND, f"binding {binding.binding_id} not found"
        )
    if caller.kind is CallerKind.DEVICE and binding.device_digest not in device:
        raise errors.PermissionDenied(
            ErrorReason.ERROR_REASON_BINDING_OF_OTHER_DEVICE,
            "the binding belongs to another device than the one named in the request",
        )


async def record_report(
    session: AsyncSession,
    bindings: BindingReader,
    report: Report,
    caller: Principal,
    device: list[bytes],
) -> int:
    """Records a checked report of the caller (a device naming `device`, or a
    partner); returns how many events were recorded."""
    assert report.binding_id is not None
    binding, _ = await entitlements.of_binding(
        session, bindings, report.binding_id, report.service_id
    )
    check_scope(binding, caller, device)
    source = "device" if caller.kind is CallerKind.DEVICE else "partner"
    return await record(session, binding, report.service_id, source, report.events)


async def record(
    session: AsyncSession, binding: BindingFacts, service_id: str, source: str, events: list[Event]
) -> int:
    session.add_all(
        UsageRecord(
            partner_id=binding.partner_id,
            service_id=service_id,
            binding_id=binding.binding_id,
            account_digest=binding.account_digest,
            device_digest=binding.device_digest,
            source=source,
            metric=e.metric,
            quantity=e.quantity,
            occur_time=e.occur_time,
            day=e.occur_time.date(),
        )
        for e in events
    )
    await session.flush()
    return len(events)


@dataclass(frozen=True)
class Known:
    figures: list[tuple[str, int]]
    period: str
    as_of: datetime | None


async def save_answer(
    session: AsyncSession,
    binding_id: uuid.UUID,
    service_id: str,
    figures: list[tuple[str, int]],
    period: str,
) -> None:
    await session.merge(
        UsageAnswer(
            binding_id=binding_id,
            service_id=service_id,
            figures=json.dumps([{"metric": m, "quantity": q} for m, q in figures]),
            period=period[:MAX_PERIOD],
            answer_time=utcnow(),
        )
    )


async def last_known(session: AsyncSession, binding_id: uuid.UUID, service_id: str) -> Known:
    """The partner's last live answer, else the sums of reported events."""
    answer = await session.get(UsageAnswer, (binding_id, service_id))
    if answer is not None:
        figures = [(f["metric"], int(f["quantity"])) for f in json.loads(answer.figures)]
        return Known(figures, answer.period, answer.answer_time)
    rows = (
        await session.execute(
            select(UsageRecord.metric, _sum(UsageRecord.quantity), func.max(UsageRecord.occur_time))
            .where(UsageRecord.binding_id == binding_id, UsageRecord.service_id == service_id)
            .group_by(UsageRecord.metric)
            .order_by(UsageRecord.metric)
        )
    ).all()
    as_of = max((r[2] for r in rows), default=None)
    return Known([(r[0], _saturated(r[1])) for r in rows], "reported events", as_of)


@dataclass(frozen=True)
class UsageFilter:
    start: datetime
    end: datetime
    partner_id: str = ""
    service_id: str = ""
    device_digests: tuple[bytes, ...] = ()
    account_digests: tuple[bytes, ...] = ()
    binding_id: uuid.UUID | None = None


@dataclass(frozen=True)
class DayRow:
    day: date
    partner_id: str
    service_id: str
    metric: str
    event_count: int
    quantity: int

    def key(self) -> list[Any]:
        return [self.day.isoformat(), self.partner_id, self.service_id, self.metric]


def _filtered(statement: _S, f: UsageFilter) -> _S:
    r = UsageRecord
    statement = statement.where(r.occur_time >= f.start, r.occur_time < f.end)
    if f.partner_id:
        statement = statement.where(r.partner_id == f.partner_id)
    if f.service_id:
        statement = statement.where(r.service_id == f.service_id)
    if f.device_digests:
        statement = statement.where(r.device_digest.in_(f.device_digests))
    if f.account_digests:
        statement = statement.where(r.account_digest.in_(f.account_digests))
    if f.binding_id is not None:
        statement = statement.where(r.binding_id == f.binding_id)
    return statement


async def per_day(
    session: AsyncSession, f: UsageFilter, after: list[Any] | None, limit: int
) -> list[DayRow]:
    """Per-day sums, keyset-paged on (day, partner, service, metric)."""
    r = UsageRecord
    keys = (r.day, r.partner_id, r.service_id, r.metric)
    statement = _filtered(select(*keys, func.count(), _sum(r.quantity)), f)
    statement = statement.group_by(*keys).order_by(*keys).limit(limit)
    if after is not None:
        statement = statement.having(
            tuple_(*keys) > tuple_(date.fromisoformat(after[0]), after[1], after[2], after[3])
        )
    rows = (await session.execute(statement)).all()
    return [DayRow(row[0], row[1], row[2], row[3], int(row[4]), _saturated(row[5])) for row in rows]


async def totals(session: AsyncSession, f: UsageFilter) -> list[tuple[str, int, int]]:
    r = UsageRecord
    statement = _filtered(select(r.metric, func.count(), _sum(r.quantity)), f)
    rows = (await session.execute(statement.group_by(r.metric).order_by(r.metric))).all()
    return [(row[0], int(row[1]), _saturated(row[2])) for row in rows]


def _sum(quantity: Any) -> Any:
    """The sum of quantities, which each fit int64 but together may not: as
    numeric on PostgreSQL, as a float on SQLite (whose integer sum() fails
    on overflow)."""
    return func.sum(quantity * 1.0)


def _saturated(total: Any) -> int:
    """A sum as the contract's int64 carries it: at most its largest value."""
    return min(int(total), MAX_QUANTITY_SUM)
