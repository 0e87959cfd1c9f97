"""The web side's JSON: checked for shape and types here, for content by
the same validation as gRPC (Guard.evaluate).

/guard/evaluate: {"action": "register" | "login" | "collaborate", "account":
str, "room_id": str (collaborate only), "components": {FingerprintComponents'
fields by their proto names}}. The client IP never comes from the body.

/guard/logout and /guard/leave free a slot: {"account": str, "identity": str
(the verdict's identity), "room_id": str (leave only)}.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, cast

from tether.server.errors import Violations
from tether.server.guard.fingerprint import Components
from tether.server.guard.service import AccountRef, Action, Verdict

_TEXT = {"browser_name", "browser_version", "os_name", "os_version", "timezone", "platform"}
_INTS = {"screen_width", "screen_height", "color_depth"}
_LISTS = {"fonts", "plugins", "languages"}
_KNOWN = {f.name for f in fields(Components)}

PROMPTS = {
    "register_limit": "This browser has already been used to register the maximum number "
    "of accounts. Registration is refused.",
    "login_limit": "Too many accounts are logged in from this browser. Log out of another "
    "account first.",
    "collaborate_limit": "Too many accounts from this browser are already in this room.",
}


@dataclass
class Call:
    action: Action | None
    account: AccountRef | None
    room_id: str
    components: Components | None


@dataclass
class Slot:
    """What a log-out or a leave frees: one account's place for one identity."""

    account: AccountRef | None
    room_id: str
    identity: str


def _components(raw: Any, violations: Violations) -> Components | None:
    if not isinstance(raw, dict):
        violations.add("components", "required: an object")
        return None
    c = Components()
    for name, value in raw.items():
        path = f"components.{name}"
        if name not in _KNOWN:
            violations.add(path, "unknown component")
        elif name in _TEXT and not isinstance(value, str):
            violations.add(path, "must be a string")
        elif name in _INTS and (not isinstance(value, int) or isinstance(value, bool)):
            violations.add(path, "must be an integer")
        elif name == "pixel_ratio" and not _a_ratio(value):
            violations.add(path, "must be a number")
        elif name in _LISTS and not (
            isinstance(value, list) and all(isinstance(x, str) for x in value)
        ):
            violations.add(path, "must be a list of strings")
        elif name == "extra" and not (
            isinstance(value, dict) and all(isinstance(x, str) for x in value.values())
        ):
            violations.add(path, "must be an object of strings")
        else:
            setattr(c, name, float(value) if name == "pixel_ratio" else value)
    return c


def _a_ratio(value: Any) -> bool:
    """A JSON number a float can hold (an integer of 400 digits cannot)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _body(data: Any, violations: Violations) -> dict[str, Any]:
    if not isinstance(data, dict):
        violations.add("", "the body must be a JSON object")
        violations.raise_if_any()
    return cast(dict[str, Any], data)


def _text(data: dict[str, Any], name: str, violations: Violations) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        violations.add(name, "must be a string")
        return ""
    return value


def _account(data: dict[str, Any], violations: Violations) -> AccountRef | None:
    """The demo's accounts are login ids; absent or empty: None (the guard
    says it is required)."""
    value = data.get("account")
    if value is not None and not isinstance(value, str):
        violations.add("account", "must be a string")
    return AccountRef("login_id", value) if value and isinstance(value, str) else None


def parse(data: Any) -> Call:
    violations = Violations()
    body = _body(data, violations)
    action_raw: Any = body.get("action")
    action = Action(action_raw) if action_raw in Action.__members__.values() else None
    account = _account(body, violations)
    room_id = _text(body, "room_id", violations)
    components = _components(body.get("components"), violations)
    violations.raise_if_any()
    return Call(action, account, room_id, components)


def parse_slot(data: Any, *, room: bool) -> Slot:
    """room: whether the slot is a room's (leave) or a log-in's (logout)."""
    violations = Violations()
    body = _body(data, violations)
    account = _account(body, violations)
    room_id = _text(body, "room_id", violations) if room else ""
    identity = _text(body, "identity", violations)
    violations.raise_if_any()
    return Slot(account, room_id, identity)


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    return {
        "verdict": "allow" if verdict.allowed else "deny",
        "reason": verdict.reason.value,
        "identity": verdict.identity,
        "count": verdict.counted,
        "limit": verdict.limit,
        "would_deny": verdict.would_deny,
        "fail_open": verdict.fail_open,
        "expire_time": verdict.expire_time.isoformat() if verdict.expire_time else None,
        "prompt": "" if verdict.allowed else PROMPTS.get(verdict.reason.value, "Refused."),
    }
