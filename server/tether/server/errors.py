"""Domain errors. The domain raises these; transport/status.py turns them
into a gRPC status with google.rpc details, in one place.

The reasons are the contract's ErrorReason values, so clients can branch on
them; the classes name the category, which decides the status code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tether.common.v1.errors_pb2 import ErrorReason

# Violations named in an error's message; the rest are counted.
SUMMARIZED = 5


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class TetherError(Exception):
    reason: ErrorReason.ValueType
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    # Extra key/values for google.rpc.ErrorInfo.metadata (ids, limits).
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_seconds: float | None = None

    def __str__(self) -> str:
        return self.message


class InvalidArgument(TetherError):
    pass


class NotFound(TetherError):
    pass


class AlreadyExists(TetherError):
    pass


class FailedPrecondition(TetherError):
    pass


class PermissionDenied(TetherError):
    pass


class Unauthenticated(TetherError):
    pass


class ResourceExhausted(TetherError):
    pass


class Unavailable(TetherError):
    pass


class DeadlineExceeded(TetherError):
    pass


class Violations:
    """Collects every bad field of a request so the caller sees them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, path: str, description: str) -> None:
        self.items.append(FieldViolation(path, description))

    def extend(self, prefix: str, others: Iterable[FieldViolation]) -> None:
        for v in others:
            self.add(f"{prefix}.{v.field}" if prefix else v.field, v.description)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.items[:SUMMARIZED])
            if len(self.items) > SUMMARIZED:
                # The details carry them all; the message says they exist.
                summary += f"; and {len(self.items) - SUMMARIZED} more"
            raise InvalidArgument(
                ErrorReason.ERROR_REASON_INVALID_FIELD,
                f"invalid request: {summary}",
                violations=list(self.items),
            )


def invalid(path: str, description: str) -> InvalidArgument:
    """One bad field, as an error ready to raise."""
    return InvalidArgument(
        ErrorReason.ERROR_REASON_INVALID_FIELD,
        f"invalid request: {path}: {description}",
        violations=[FieldViolation(path, description)],
    )
