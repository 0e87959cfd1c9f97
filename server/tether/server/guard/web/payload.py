"""The web side's JSON: checked for shape and types here, for content by
the same validation as gRPC (Guard.evaluate).

Request: {"action": "register" | "login" | "collaborate", "account": str,
"room_id": str (collaborate only), "components": {FingerprintComponents'
fields by their proto names}}. The client IP never comes from the body.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tether.server.errors import Violations
from tether.server.guard.identity import Components
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


def _components(raw: Any, v: Violations) -> Components | None:
    if not isinstance(raw, dict):
        v.add("components", "required: an object")
        return None
    c = Components()
    for name, value in raw.items():
        path = f"components.{name}"
        if name not in _KNOWN:
            v.add(path, "unknown component")
        elif name in _TEXT and not isinstance(value, str):
            v.add(path, "must be a string")
        elif name in _INTS and (not isinstance(value, int) or isinstance(value, bool)):
            v.add(path, "must be an integer")
        elif name == "pixel_ratio" and (
            not isinstance(value, int | float) or isinstance(value, bool)
        ):
            v.add(path, "must be a number")
        elif name in _LISTS and not (
            isinstance(value, list) and all(isinstance(x, str) for x in value)
        ):
            v.add(path, "must be a list of strings")
        elif name == "extra" and not (
            isinstance(value, dict) and all(isinstance(x, str) for x in value.values())
        ):
            v.add(path, "must be an object of strings")
        else:
            setattr(c, name, float(value) if name == "pixel_ratio" else value)
    return c


def parse(data: Any) -> Call:
    v = Violations()
    if not isinstance(data, dict):
        v.add("", "the body must be a JSON object")
        v.raise_if_any()
    action_raw = data.get("action")
    action = Action(action_raw) if action_raw in Action.__members__.values() else None
    account_raw = data.get("account")
    if account_raw is not None and not isinstance(account_raw, str):
        v.add("account", "must be a string")
    room_id = data.get("room_id", "")
    if not isinstance(room_id, str):
        v.add("room_id", "must be a string")
        room_id = ""
    components = _components(data.get("components"), v)
    v.raise_if_any()
    account = AccountRef("login_id", account_raw) if account_raw else None
    return Call(action, account, room_id, components)


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
