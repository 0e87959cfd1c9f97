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

from sqlalchemy import select
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
from tether.server.storage.base import utcnow

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
    """What one confirmation did: an outcome, or the error refusing it."""

    instruction_id: uuid.UUID
    outcome: Outcome | None = None
    row: Instruction | None = None
    error: TetherError | None = None


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
    partner cannot deadlock.
    """
    ids = sorted({instruction_id for instruction_id, _ in items})
    rows = {
        row.instruction_id: row
        for row in await session.scalars(
            select(Instruction)
            .where(Instruction.instruction_id.in_(ids))
            .order_by(Instruction.seq)
            .with_for_update()
        )
    }
    now = utcnow()
    effects: list[tuple[Instruction, str, str]] = []
    applied = []
    for instruction_id, result in items:
        row = rows.get(instruction_id)
        # Another partner's instruction gets the same answer as a missing one.
        if row is None or row.partner_id != partner_id:
            applied.append(Applied(instruction_id, error=_not_found(instruction_id)))
            continue
        try:
            outcome = _apply(row, result, timing, now, effects)
        except TetherError as exc:
            applied.append(Applied(instruction_id, row=row, error=exc))
            continue
        applied.append(Applied(instruction_id, outcome, row))
    await _set_entitlements(session, notify, effects)
    return applied


def _apply(
    row: Instruction,
    result: Result,
    timing: Timing,
    now: datetime,
    effects: list[tuple[Instruction, str, str]],
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
    row.update_time = now
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


def _same_final(row: Instruction, result: Result) -> bool:
    if isinstance(result, Done):
        return (
            row.state == CONFIRMED
            and row.partner_service_reference == result.partner_service_reference
        )
    return row.state == FAILED and not result.retryable and row.last_error == result.reason


def _final_text(row: Instruction) -> str:
    if row.state == CONFIRMED:
        return f"done (reference {row.partner_service_reference!r})"
    return f"failed permanently ({row.last_error!r})"


async def _set_entitlements(
    session: AsyncSession, notify: wakeup.Wakeup, effects: list[tuple[Instruction, str, str]]
) -> None:
    if not effects:
        return
    binding_ids = sorted({row.binding_id for row, _, _ in effects})
    entitlements = {
        (ent.binding_id, ent.service_id): ent
        for ent in await session.scalars(
            select(Entitlement)
            .where(Entitlement.binding_id.in_(binding_ids))
            .order_by(Entitlement.binding_id, Entitlement.service_id)
            .with_for_update()
        )
    }
    changed = []
    now = utcnow()
    for row, state, reason in effects:
        ent = entitlements.get((row.binding_id, row.service_id))
        # Only an entitlement still being opened moves: a binding revoked in
        # the meantime stays revoked, whatever the partner says of the open.
        if ent is None or ent.state != ACTIVATING:
            continue
        ent.state = state
        ent.reason = reason
        ent.update_time = now
        changed.append(ent)
    await feed.record(session, notify, changed)
