"""A partner's result for an instruction: applied exactly once.

The instruction row is locked, its state decides: the first final result
(done, or failed for good) changes the instruction and the entitlement; the
same result again changes nothing; a different final result is refused. A
late confirmation (after the lease ran out, after a redelivery, even after
the instruction was parked as dead) is still the partner's truth and counts.

`decide` is that rule, on rows the store has locked; the stores
(store_sqlalchemy.py, store_postgres.py) lock, read and write.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import FailedPrecondition, NotFound, TetherError, Violations, invalid
from tether.server.provisioning.leasing import Timing
from tether.server.provisioning.tables import (
    ACTIVE,
    CONFIRMED,
    DEAD,
    FAILED,
    OPEN,
    PENDING,
)

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


ROW_COLUMNS = [name for name in Row.__dataclass_fields__ if name != "changed"]
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
