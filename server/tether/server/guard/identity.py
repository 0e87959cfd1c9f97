"""A fingerprint's identity: the one person behind a browser, as the guard
counts accounts per person.

The identity is a keyed hash of the fingerprint's *stable* components,
normalized so that trivial differences (case, order of fonts, spacing) do not
split one browser in two. Components that change on their own (the browser's
version, the IP address) are left out. The raw components live only for the
duration of one call: SQL keeps the identity and, for later drift linking, a
sketch of per-component keyed digests (docs/guard.md explains how a drifting
browser can be linked to its earlier self from the sketch).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field

from tether.server.errors import Violations
from tether.server.shared.digests import Digester

IDENTITY = re.compile(r"^[0-9a-f]{32}$")
_EXTRA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

MAX_TEXT = 128
MAX_FONTS = 512
MAX_PLUGINS = 128
MAX_PLUGIN = 256
MAX_LANGUAGES = 32
MAX_LANGUAGE = 35
MAX_EXTRA = 32
MAX_EXTRA_VALUE = 1024


@dataclass
class Components:
    """The collector's report, as plain values (from gRPC or HTTP alike)."""

    browser_name: str = ""
    browser_version: str = ""
    os_name: str = ""
    os_version: str = ""
    screen_width: int = 0
    screen_height: int = 0
    pixel_ratio: float = 0.0
    color_depth: int = 0
    fonts: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    timezone: str = ""
    platform: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _text(value: str, path: str, violations: Violations, max_len: int, required: bool) -> None:
    if required and not value.strip():
        violations.add(path, "required")
    elif len(value) > max_len:
        violations.add(path, f"at most {max_len} characters")
    elif not value.isprintable():
        violations.add(path, "control characters are not allowed")


def _texts(
    values: list[str], path: str, violations: Violations, max_count: int, max_len: int
) -> None:
    if len(values) > max_count:
        violations.add(path, f"at most {max_count} entries")
        return
    # The common, valid case in one pass of C-level checks (this runs on
    # every Evaluate); the per-entry loop only to say which entry is bad.
    if all(0 < len(x) <= max_len and x.isprintable() and not x.isspace() for x in values):
        return
    for i, value in enumerate(values):
        _text(value, f"{path}[{i}]", violations, max_len, required=True)


def check(c: Components, prefix: str, violations: Violations) -> None:
    """Reports every malformed or missing component under prefix."""
    p = prefix + "."
    _text(c.browser_name, p + "browser_name", violations, MAX_TEXT, required=True)
    _text(c.browser_version, p + "browser_version", violations, MAX_TEXT, required=True)
    _text(c.os_name, p + "os_name", violations, MAX_TEXT, required=True)
    _text(c.os_version, p + "os_version", violations, MAX_TEXT, required=False)
    _text(c.timezone, p + "timezone", violations, MAX_TEXT, required=False)
    _text(c.platform, p + "platform", violations, MAX_TEXT, required=False)
    for name in ("screen_width", "screen_height"):
        if not 1 <= getattr(c, name) <= 100_000:
            violations.add(p + name, "required: 1-100000 CSS pixels")
    if c.pixel_ratio and not 0.1 <= c.pixel_ratio <= 16:
        violations.add(p + "pixel_ratio", "0.1-16, or 0 for unknown")
    if not 0 <= c.color_depth <= 64:
        violations.add(p + "color_depth", "0-64 bits")
    _texts(c.fonts, p + "fonts", violations, MAX_FONTS, MAX_TEXT)
    _texts(c.plugins, p + "plugins", violations, MAX_PLUGINS, MAX_PLUGIN)
    if not c.languages:
        violations.add(p + "languages", "required: at least one BCP 47 tag")
    _texts(c.languages, p + "languages", violations, MAX_LANGUAGES, MAX_LANGUAGE)
    if len(c.extra) > MAX_EXTRA:
        violations.add(p + "extra", f"at most {MAX_EXTRA} entries")
    else:
        for key, value in c.extra.items():
            if not _EXTRA_KEY.match(key):
                violations.add(f"{p}extra[{key[:64]!r}]", "key: 1-64 of [A-Za-z0-9_.-]")
            else:
                _text(value, f"{p}extra[{key!r}]", violations, MAX_EXTRA_VALUE, required=False)


def check_ip(value: str, path: str, violations: Violations) -> None:
    # inet_pton (C) accepts the common addresses at a fraction of ipaddress's
    # cost; whatever it refuses (scoped IPv6, garbage) ipaddress decides.
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    except (OSError, ValueError):
        pass
    else:
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        violations.add(path, "required: an IPv4 or IPv6 address")


def check_identity(value: str, path: str, violations: Violations) -> None:
    if not IDENTITY.match(value):
        violations.add(path, "32 lower-case hex characters, as Evaluate returned it")


def _norm(value: str) -> str:
    return " ".join(value.casefold().split())


def stable(c: Components) -> dict[str, str]:
    """The normalized stable components, one canonical string each.

    Sets (fonts, plugins) are sorted and deduplicated: their order depends on
    the browser's enumeration, not on the user. Language order is kept: it is
    the user's preference. (Fonts and plugins spell out _norm inline: a
    call per entry of a ~60-font list showed in a new browser's cost.)
    """
    parts = {
        "browser": _norm(c.browser_name),
        "os": _norm(c.os_name),
        "screen": f"{c.screen_width}x{c.screen_height}",
        "pixel_ratio": f"{round(c.pixel_ratio, 2):g}",
        "color_depth": str(c.color_depth),
        "fonts": "\n".join(sorted({" ".join(f.casefold().split()) for f in c.fonts})),
        "plugins": "\n".join(sorted({" ".join(p.casefold().split()) for p in c.plugins})),
        "languages": ",".join(_norm(x) for x in c.languages),
        "timezone": _norm(c.timezone),
        "platform": _norm(c.platform),
    }
    for key, value in c.extra.items():
        parts["x." + key] = value.strip()
    return parts


def identity(digester: Digester, c: Components) -> str:
    """32 hex characters: the keyed hash of the stable components."""
    return identity_of(digester, stable(c))


def identity_of(digester: Digester, parts: dict[str, str]) -> str:
    """identity() of components already made stable()."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return digester.digest("guard-fingerprint", canonical)[:16].hex()


def sketch(digester: Digester, c: Components) -> dict[str, str]:
    """Component name -> 16 hex characters of its own keyed digest: what a
    later drift linker compares (docs/guard.md). Computed only when an
    identity is recorded, not on every call."""
    return sketch_of(digester, stable(c))


def sketch_of(digester: Digester, parts: dict[str, str]) -> dict[str, str]:
    """sketch() of components already made stable()."""
    digest = digester.current.digest
    return {
        name: digest("guard-component", f"{name}={value}")[:8].hex()
        for name, value in parts.items()
    }


class IdentityCache:
    """Identities of recently seen, already validated component sets, keyed
    by a digest of their serialized form: a browser that comes back with the
    same components skips validation and hashing. Holds no raw component."""

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._entries: dict[bytes, str] = {}

    def get(self, key: bytes) -> str | None:
        return self._entries.get(key) if key else None

    def put(self, key: bytes, value: str) -> None:
        if not key:
            return
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = value
