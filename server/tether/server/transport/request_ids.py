"""The request_id that makes a mutating call safe to retry: what a valid one looks like.

What is done with it (the stored answer) is storage.idempotency's.
"""

from __future__ import annotations

from tether.server.errors import Violations

MAX_REQUEST_ID = 64


def check_request_id(request_id: str, violations: Violations) -> None:
    if not request_id:
        violations.add("request_id", "required: a caller-chosen id that makes retries safe")
    elif len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        violations.add("request_id", f"at most {MAX_REQUEST_ID} printable characters")
