"""Reading Tether's rich errors: the stable reason and the bad fields."""

from __future__ import annotations

import re
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


# How gRPC words a TLS handshake that failed, in the status details.
VERIFY_FAILED = re.compile(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)")
HANDSHAKE_FAILED = re.compile(r"(?:tls|ssl) handshake failed[^:]*: (.*)", re.IGNORECASE)


def tls_refused(error: grpc.aio.AioRpcError) -> bool:
    """Whether the call never left the TLS handshake for a reason a retry
    cannot fix: a certificate refused, or TLS and plaintext mixed up."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    message = error.details() or ""
    return bool(HANDSHAKE_FAILED.search(message)) or "WRONG_VERSION_NUMBER" in message
