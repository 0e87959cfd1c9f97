"""Opaque page tokens: the last key of a page, tied to the listing it came from."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0 or requested > MAX_PAGE_SIZE:
        raise InvalidArgument(
            ErrorReason.ERROR_REASON_INVALID_FIELD,
            f"page_size must be 0-{MAX_PAGE_SIZE}",
            violations=[FieldViolation("page_size", f"must be 0-{MAX_PAGE_SIZE}")],
        )
    return requested or DEFAULT_PAGE_SIZE


def _scope_tag(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:12]


def encode(scope: str, last_key: Any) -> str:
    """scope names the listing (RPC + filter), so a token cannot be replayed elsewhere."""
    raw = json.dumps({"s": _scope_tag(scope), "k": last_key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(scope: str, token: str) -> Any:
    """The last key of the previous page, or None for the first page."""
    if not token:
        return None
    invalid = InvalidArgument(
        ErrorReason.ERROR_REASON_PAGE_TOKEN_INVALID,
        "page_token does not belong to this listing; start again without it",
        violations=[FieldViolation("page_token", "not a token of this listing")],
    )
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        scope_ok = isinstance(data, dict) and data.get("s") == _scope_tag(scope)
    except (ValueError, RecursionError) as exc:  # a forged token nested deeper than JSON goes
        raise invalid from exc
    if not scope_ok or "k" not in data:
        raise invalid
    return data["k"]
