"""Domain errors to gRPC status, in one place.

Every non-OK status carries google.rpc.ErrorInfo (reason + domain "tether")
and, for bad input, google.rpc.BadRequest with every field violation.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors

ERROR_DOMAIN = "tether"

# A status travels in trailing metadata, which clients refuse beyond 8-16
# KiB (gRPC's soft and hard limits): a caller's 10,000-character value
# echoed back would turn INVALID_ARGUMENT into "Stream removed". So texts
# are cut, and the violations listed stop at a budget, the rest counted.
MAX_MESSAGE = 1000
MAX_TEXT = 300
VIOLATIONS_BUDGET = 3000


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _listed(
    violations: list[errors.FieldViolation],
) -> list[error_details_pb2.BadRequest.FieldViolation]:
    listed: list[error_details_pb2.BadRequest.FieldViolation] = []
    spent = 0
    for i, v in enumerate(violations):
        field, description = _cut(v.field), _cut(v.description)
        spent += len(field) + len(description)
        if spent > VIOLATIONS_BUDGET and listed:
            listed.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field="", description=f"and {len(violations) - i} more, not listed"
                )
            )
            break
        listed.append(
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        )
    return listed


_CODES: dict[type[errors.TetherError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(error: errors.TetherError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: errors.TetherError) -> grpc.Status:
    code = code_of(error)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=ErrorReason.Name(error.reason),
                domain=ERROR_DOMAIN,
                metadata={key: _cut(value) for key, value in error.metadata.items()},
            )
        )
    ]
    if error.violations:
        details.append(
            _pack(error_details_pb2.BadRequest(field_violations=_listed(error.violations)))
        )
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=_cut(error.message, MAX_MESSAGE), details=details
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: errors.TetherError
) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
