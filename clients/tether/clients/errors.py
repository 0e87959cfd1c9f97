"""Reading Tether's rich errors: the stable reason and the bad fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class ErrorDetail:
    code: grpc.StatusCode
    message: str
    # The ErrorReason name, e.g. "ERROR_REASON_PARTNER_NOT_FOUND"; "" if absent.
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    # field path -> description, from google.rpc.BadRequest.
    violations: dict[str, str] = field(default_factory=dict)
    retry_after_seconds: float | None = None


def details_of(error: grpc.aio.AioRpcError) -> ErrorDetail:
    detail = ErrorDetail(error.code(), error.details() or "")
    for key, value in error.trailing_metadata() or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for packed in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if packed.Unpack(info):
                detail.reason = info.reason
                detail.metadata = dict(info.metadata)
            elif packed.Unpack(bad):
                detail.violations.update({v.field: v.description for v in bad.field_violations})
            elif packed.Unpack(retry):
                detail.retry_after_seconds = retry.retry_delay.ToNanoseconds() / 1e9
    return detail
