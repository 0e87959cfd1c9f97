"""A partner's result for an instruction: applied exactly once.

The instruction row is locked, its state decides: the first final result
(done, or failed for good) changes the instruction and the entitlement; the
same result again changes nothing; a different final result is refused. A
late confirmation (after the lease ran out, after a redelivery, even after
the instruction was parked as dead) is still the partner's truth and counts.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import FailedPrecondition, NotFound, TetherError, Violations, invalid
from tether.server.provisioning import feed, wakeup
from tether.server.provisioning.leasing import Timing
from tether.server.provisioning.tables import (
    ACTIVATING,
    ACTIVE,
    CONFIRMED,
    DEAD,
    FAILED,
    OPEN,
    PENDING,
    Entitlement,
    Instruction,
)
from tether.server.storage.base import Base, utcnow

MAX_REASON = 500
MAX_REFERENCE = 128


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    RETRY_SCHEDULED = "retry_scheduled"


@dataclass(frozen=True)
class Done:
    partner_service_reference: str = ""


@dataclass(frozen=True)
class Failed:
    retryable: bool
    reason: str = ""


Result = Done | Failed


def instruction_id_of(value: str, path: str, violations: Violations) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        violations.add(path, "required: an instruction id (a UUID in canonical text form)")
        return None


def check_result(result: Result, path: str) -> None:
    if isinstance(result, Done):
        ref = result.partner_service_reference
        if len(ref) > MAX_REFERENCE or not ref.isprintable():
            raise invalid(f"{path}.partner_service_reference", "at most 128 printable characters")
    elif len(result.reason) > MAX_REASON:
        raise invalid(f"{path}.reason", f"at most {MAX_REASON} characters")


def _not_found(instruction_id: uuid.UUID) -> NotFound:
    return NotFound(
        ErrorReason.ERROR_REASON_INSTRUCTION_NOT_FOUND,
        f"instruction {instruction_id} not found",
        metadata={"instruction_id": str(instruction_id)},
    )


@dataclass(frozen=True)
class Applied:
    """What one confirmation did: an outcome and the instruction's new state,
    or the error refusing it."""

    instruction_id: uuid.UUID
    outcome: Outcome | None = None
    state: str = ""
    error: TetherError | None = None


@dataclass
class Row:
    """The columns of an instruction a confirmation reads and writes."""

    seq: int
    instruction_id: uuid.UUID
    partner_id: str
    kind: str
    binding_id: uuid.UUID
    service_id: str
    state: str
    attempts: int
    due_time: datetime
    lease_owner: str | None
    last_error: str
    partner_service_reference: str
    changed: bool = False


_I = Base.metadata.tables[Instruction.__tablename__]
_E = Base.metadata.tables[Entitlement.__tablename__]
ROW_COLUMNS = [name for name in Row.__dataclass_fields__ if name != "changed"]
_ROW_COLUMNS = [_I.c[name] for name in ROW_COLUMNS]
# An entitlement change a confirmation causes: the instruction's row, the
# new state, the reason.
Effect = tuple[Row, str, str]


def decide(
    rows: dict[uuid.UUID, Row],
    items: Sequence[tuple[str, uuid.UUID, Result]],
    timing: Timing,
    now: datetime,
) -> tuple[list[Applied], list[Effect]]:
    """What each (partner, instruction, result) does to the locked rows, in
    order: one Applied per item, and the entitlement changes to make. Marks
    the rows it changes (Row.changed)."""
    effects: list[Effect] = []
    applied = []
    for partner_id, instruction_id, result in items:
        row = rows.get(instruction_id)
        # Another partner's instruction gets the same answer as a missing one.
        if row is None or row.partner_id != partner_id:
            applied.append(Applied(instruction_id, error=_not_found(instruction_id)))
            continue
        try:
            outcome = _apply(row, result, timing, now, effects)
        except TetherError as exc:
            applied.append(Applied(instruction_id, state=row.state, error=exc))
            continue
        applied.append(Applied(instruction_id, outcome, row.state))
    return applied, effects


async def confirm_many(
    session: AsyncSession,
    notify: wakeup.Wakeup,
    *,
    partner_id: str,
    items: Sequence[tuple[uuid.UUID, Result]],
    timing: Timing,
) -> list[Applied]:
    """Applies confirmations in one transaction; one Applied per item, in order.

    Rows are locked in delivery order (seq), so concurrent batches of one
    partner cannot deadlock. Core statements, not ORM objects. (On
    PostgreSQL the partner streams take the set-based path in `postgres`.)
    """
    ids = sorted({instruction_id for instruction_id, _ in items})
    locked = await session.execute(
        select(*_ROW_COLUMNS)
        .where(_I.c.instruction_id.in_(ids))
        .order_by(_I.c.seq)
        .with_for_update()
    )
    rows = {r.instruction_id: Row(*r) for r in locked}
    now = utcnow()
    applied, effects = decide(rows, [(partner_id, i, result) for i, result in items], timing, now)
    changed = [r for r in rows.values() if r.changed]
    if changed:
        await session.execute(
            update(_I)
            .where(_I.c.seq == bindparam("b_seq"))
            .values(
                state=bindparam("b_state"),
                due_time=bindparam("b_due"),
                lease_owner=bindparam("b_owner"),
                last_error=bindparam("b_error"),
                partner_service_reference=bindparam("b_ref"),
                update_time=now,
            ),
            [
                {
                    "b_seq": r.seq,
                    "b_state": r.state,
                    "b_due": r.due_time,
                    "b_owner": r.lease_owner,
                    "b_error": r.last_error,
                    "b_ref": r.partner_service_reference,
                }
                for r in changed
            ],
        )
    await _set_entitlements(session, notify, effects, now)
    return applied


def _apply(
    row: Row,
    result: Result,
    timing: Timing,
    now: datetime,
    effects: list[Effect],
) -> Outcome:
    if row.state in (CONFIRMED, FAILED):
        if _same_final(row, result):
            return Outcome.DUPLICATE
        raise FailedPrecondition(
            ErrorReason.ERROR_REASON_CONFIRMATION_CONFLICT,
            f"instruction {row.instruction_id} was already confirmed {_final_text(row)}; "
            "the first result stands",
            metadata={"instruction_id": str(row.instruction_id), "state": row.state},
        )
    row.changed = True
    row.lease_owner = None
    if isinstance(result, Done):
        row.state = CONFIRMED
        row.partner_service_reference = result.partner_service_reference
        if row.kind == OPEN:
            effects.append((row, ACTIVE, ""))
        return Outcome.ACCEPTED
    row.last_error = result.reason
    if not result.retryable:
        row.state = FAILED
        if row.kind == OPEN:
            effects.append((row, FAILED, result.reason))
        return Outcome.ACCEPTED
    if row.attempts >= timing.max_attempts:
        row.state = DEAD
    else:
        row.state = PENDING
        row.due_time = now + timing.retry_after(max(row.attempts, 1))
    return Outcome.RETRY_SCHEDULED


def _same_final(row: Row, result: Result) -> bool:
    if isinstance(result, Done):
        return (
            row.state == CONFIRMED
            and row.partner_service_reference == result.partner_service_reference
        )
    return row.state == FAILED and not result.retryable and row.last_error == result.reason


def _final_text(row: Row) -> str:
    if row.state == CONFIRMED:
        return f"done (reference {row.partner_service_reference!r})"
    return f"failed permanently ({row.last_error!r})"


async def _set_entitlements(
    session: AsyncSession,
    notify: wakeup.Wakeup,
    effects: list[Effect],
    now: datetime,
) -> None:
    if not effects:
        return
    binding_ids = sorted({row.binding_id for row, _, _ in effects})
    locked = await session.execute(
        select(*feed.ENTRY_COLUMNS)
        .where(_E.c.binding_id.in_(binding_ids))
        .order_by(_E.c.binding_id, _E.c.service_id)
        .with_for_update()
    )
    entitlements = {(e.binding_id, e.service_id): feed.Entry(*e) for e in locked}
    changed = []
    for row, state, reason in effects:
        entry = entitlements.get((row.binding_id, row.service_id))
        # Only an entitlement still being opened moves: a binding revoked in
        # the meantime stays revoked, whatever the partner says of the open.
        if entry is None or entry.state != ACTIVATING:
            continue
        entry.state = state
        entry.reason = reason
        changed.append(entry)
    if not changed:
        return
    await session.execute(
        update(_E)
        .where(_E.c.binding_id == bindparam("b_binding"), _E.c.service_id == bindparam("b_service"))
        .values(state=bindparam("b_state"), reason=bindparam("b_reason"), update_time=now),
        [
            {
                "b_binding": e.binding_id,
                "b_service": e.service_id,
                "b_state": e.state,
                "b_reason": e.reason,
            }
            for e in changed
        ],
    )
    await feed.record(session, notify, changed)
