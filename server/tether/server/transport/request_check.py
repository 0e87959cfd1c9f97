"""What every request is checked for before any handler sees it: that it
parsed, that every id has its format, that no text holds a NUL (PostgreSQL
refuses it) and that every timestamp and duration is in protobuf's range.

The authenticating handler (interceptor.py) runs these checks on every
message, so a caller's malformed input is INVALID_ARGUMENT with a field
violation, never a database error or INTERNAL. Whether a field is required,
and what the id names, stays with the servicers.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors, validation
from tether.server.errors import Violations
from tether.server.transport.request_ids import MAX_REQUEST_ID

# google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# google.protobuf.Duration: about +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999

_CREDENTIAL_ID = re.compile(r"^cred_[A-Za-z0-9]{1,35}\Z")
_QUERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _is_request_id(value: str) -> bool:
    return len(value) <= MAX_REQUEST_ID and value.isprintable()


_SLUG = (
    validation.SLUG.fullmatch,
    "must be 3-63 characters of a-z, 0-9 and '-', starting with a letter",
)

# Every id field of the contracts, by field name: how a well-formed one looks.
# Empty ids pass here; the servicer says whether the field is required.
ID_FORMATS: dict[str, tuple[Callable[[str], object], str]] = {
    "partner_id": _SLUG,
    "partner_ids": _SLUG,
    "service_id": _SLUG,
    "credential_id": (
        _CREDENTIAL_ID.fullmatch,
        "must be a credential id: 'cred_' and up to 35 letters or digits",
    ),
    "binding_id": (_is_uuid, "must be a binding id (a UUID)"),
    "instruction_id": (_is_uuid, "must be an instruction id (a UUID)"),
    "query_id": (_QUERY_ID.fullmatch, "must be a usage query id as Tether sent it"),
    "request_id": (_is_request_id, f"must be at most {MAX_REQUEST_ID} printable characters"),
}
# Not here: room_id. It keys no look-up (a NUL is refused like anywhere), and
# the guard's validator names it with every other bad field of the call.


_Method = TypeVar("_Method", bound=Callable[..., Any])


def checks_own_messages(method: _Method) -> _Method:
    """Marks a client-streaming method that answers a malformed message on its
    own stream and goes on: the authenticating handler then checks only that
    each message parsed, and leaves the rest of these checks to the method."""
    method.checks_own_messages = True  # type: ignore[attr-defined]
    return method


class Refused:
    """Stands in for a request body that did not parse or failed a check."""

    def __init__(self, error: errors.InvalidArgument) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<refused request: {self.error.message}>"


def lenient(
    deserializer: Callable[[bytes], Any] | None, *, checked: bool = True
) -> Callable[[bytes], Any] | None:
    """The deserializer, answering Refused instead of raising (and, when
    checked, for a message that fails a check): the call is then refused
    after authentication, as INVALID_ARGUMENT."""
    if deserializer is None:
        return None
    # This method's own key: the same bytes parse as another type elsewhere.
    key = secrets.token_bytes(16)

    def parse(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except Exception:
            return Refused(undecodable())
        if checked:
            seen = hashlib.blake2b(data, digest_size=16, key=key).digest()
            if seen in _PASSED:
                return message
            try:
                check(message, data)
            except errors.InvalidArgument as exc:
                return Refused(exc)
            if len(_PASSED) >= PASSED_SIZE:
                _PASSED.clear()
            _PASSED.add(seen)
        return message

    return parse


# Keyed digests of request bodies that passed check: it depends on the
# bytes alone, and a client repeating a call (a returning browser's Evaluate)
# sends the same bytes again, which then skip the walk over every text.
PASSED_SIZE = 100_000
_PASSED: set[bytes] = set()


def raise_if_refused(request: object) -> None:
    if isinstance(request, Refused):
        raise request.error


def undecodable() -> errors.InvalidArgument:
    return errors.InvalidArgument(
        ErrorReason.ERROR_REASON_INVALID_FIELD,
        "invalid request: the body is not a valid protobuf message of this method's request type",
    )


def check(message: object, data: bytes | None = None) -> None:
    """Raises InvalidArgument, with every field violation, unless the request
    parsed and is well formed as far as this module can tell. data: the
    encoded message, when at hand: without a zero byte in it, no text can
    hold a NUL, and only ids and times need a look."""
    raise_if_refused(message)
    if isinstance(message, Message):
        violations = Violations()
        inspect(message, "", violations, texts=data is None or b"\x00" in data)
        violations.raise_if_any()


def inspect(message: Message, prefix: str, violations: Violations, *, texts: bool = True) -> None:
    """Adds a violation for every malformed id, NUL and out-of-range time
    (with texts False: for every malformed id and out-of-range time)."""
    descriptor = message.DESCRIPTOR
    name = descriptor.full_name
    if name == "google.protobuf.Timestamp":
        check_timestamp(message, prefix, violations)
        return
    if name == "google.protobuf.Duration":
        _check_duration(message, prefix, violations)
        return
    plan = (_PLANS.get(name) or _plan(descriptor)) if texts else _slim_plan(descriptor)
    for field_name, kind in plan:
        if kind is _MESSAGE:
            if message.HasField(field_name):
                inspect(
                    getattr(message, field_name),
                    _join(prefix, field_name),
                    violations,
                    texts=texts,
                )
        elif kind is _STRING:
            value = getattr(message, field_name)
            # The path is built only for a value that needs a closer look.
            if value and ("\x00" in value or field_name in ID_FORMATS):
                _check_string(field_name, value, _join(prefix, field_name), violations)
        elif kind is _MESSAGES:
            for i, item in enumerate(getattr(message, field_name)):
                inspect(item, f"{_join(prefix, field_name)}[{i}]", violations, texts=texts)
        elif kind is _STRINGS:
            _check_strings(field_name, getattr(message, field_name), prefix, violations)
        else:
            _check_map(getattr(message, field_name), _join(prefix, field_name), violations)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# What inspect looks at in each message type, worked out once per type: on
# the guard's hot path a walk over ListFields() cost several times more.
_MESSAGE, _STRING, _MESSAGES, _STRINGS, _MAP = (object() for _ in range(5))
_PLANS: dict[str, list[tuple[str, object]]] = {}


def _plan(descriptor: Any) -> list[tuple[str, object]]:
    plan: list[tuple[str, object]] = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                plan.append((field.name, _MAP))
            else:
                plan.append((field.name, _MESSAGES if field.is_repeated else _MESSAGE))
        elif field.type == FieldDescriptor.TYPE_STRING:
            plan.append((field.name, _STRINGS if field.is_repeated else _STRING))
    _PLANS[descriptor.full_name] = plan
    return plan


_SLIM_PLANS: dict[str, list[tuple[str, object]]] = {}
_TIMES = ("google.protobuf.Timestamp", "google.protobuf.Duration")


def _slim_plan(descriptor: Any) -> list[tuple[str, object]]:
    """The fields that hold, or lead to, an id or a time."""
    name = descriptor.full_name
    plan = _SLIM_PLANS.get(name)
    if plan is None:
        _SLIM_PLANS[name] = []  # a message that contains itself leads nowhere new
        full = _PLANS.get(name) or _plan(descriptor)
        plan = [
            (field_name, kind)
            for (field_name, kind), field in zip(full, _planned_fields(descriptor), strict=True)
            if (kind in (_STRING, _STRINGS) and field_name in ID_FORMATS)
            or (kind is _MAP and _leads_to_ids_or_times(field.message_type.fields_by_name["value"]))
            or (kind in (_MESSAGE, _MESSAGES) and _leads_to_ids_or_times(field))
        ]
        _SLIM_PLANS[name] = plan
    return plan


def _planned_fields(descriptor: Any) -> list[Any]:
    return [
        f
        for f in descriptor.fields
        if f.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING)
    ]


def _leads_to_ids_or_times(field: Any) -> bool:
    if field.type != FieldDescriptor.TYPE_MESSAGE:
        return False
    sub = field.message_type
    return sub.full_name in _TIMES or bool(_slim_plan(sub))


def _check_strings(name: str, items: Any, prefix: str, violations: Violations) -> None:
    # One search over the joined list finds whether any item has a NUL.
    if name in ID_FORMATS or "\x00" in "".join(items):
        for i, item in enumerate(items):
            _check_string(name, item, f"{_join(prefix, name)}[{i}]", violations)


def _check_map(value: Any, path: str, violations: Violations) -> None:
    if not value:
        return
    # A map of texts (the common case) needs a closer look only with a NUL in it.
    items = list(value.items())
    if isinstance(items[0][1], str) and "\x00" not in "".join(k + v for k, v in items):
        return
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            violations.add(f"{path}.key", "must not contain a NUL character")
        item_path = f"{path}[{key!r}]"
        if isinstance(item, Message):
            inspect(item, item_path, violations)
        elif isinstance(item, str) and "\x00" in item:
            violations.add(item_path, "must not contain a NUL character")


def _check_string(name: str, value: str, path: str, violations: Violations) -> None:
    if "\x00" in value:
        violations.add(path, "must not contain a NUL character")
        return
    id_format = ID_FORMATS.get(name)
    if id_format is not None and value:
        matches, description = id_format
        if not matches(value):
            violations.add(path, description)


def check_timestamp(message: Any, path: str, violations: Violations) -> None:
    if not MIN_TIMESTAMP_SECONDS <= message.seconds <= MAX_TIMESTAMP_SECONDS:
        violations.add(path, "must be a time between the years 0001 and 9999")
    elif not 0 <= message.nanos <= MAX_NANOS:
        violations.add(path, f"nanos must be 0-{MAX_NANOS}")


def _check_duration(message: Any, path: str, violations: Violations) -> None:
    seconds, nanos = message.seconds, message.nanos
    mixed_signs = seconds and nanos and (seconds < 0) != (nanos < 0)
    if not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        violations.add(path, f"must be at most {MAX_DURATION_SECONDS} seconds either way")
    elif not -MAX_NANOS <= nanos <= MAX_NANOS or mixed_signs:
        violations.add(path, f"nanos must be within +-{MAX_NANOS}, with the sign of seconds")
