"""A browser fingerprint, as the guard compares fingerprints: validated,
normalized, and reduced to keyed digests.

A fingerprint is split into groups of components that drift for different
reasons, so that linking can ask which groups changed:

- the device: browser family, OS, platform, colour depth, and the
  collector's hardware signals (cores, touch, vendor). These never drift;
  two fingerprints that differ here are two browsers.
- version: browser and OS versions (updates; they only move forward).
- screen: screen size and pixel ratio (another window, monitor or zoom).
- language: languages and time zone.
- software: fonts, plugins and rendering readouts (canvas, WebGL, audio):
  installed software, and what anti-detect browsers add noise to.

Raw components live for one call. What is kept is keyed (HMAC) digests:
the fingerprint's identity over everything, one 8-byte digest per group,
a 4-byte digest per font (so font sets can be compared without their
names), and the version numbers (to tell an update from a downgrade).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from tether.server.errors import Violations
from tether.server.shared.digests import Digester, DigestKey

IDENTITY = re.compile(r"^[0-9a-f]{32}\Z")
_EXTRA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_NUMBER = re.compile(r"\d+")

MAX_TEXT = 128
MAX_FONTS = 512
MAX_PLUGINS = 128
MAX_PLUGIN = 256
MAX_LANGUAGES = 32
MAX_LANGUAGE = 35
MAX_EXTRA = 32
MAX_EXTRA_VALUE = 1024

# The groups, in the order Fingerprint.groups keeps them.
DEVICE, VERSION, SCREEN, LANGUAGE, SOFTWARE = range(5)
GROUP_NAMES = ("device", "version", "screen", "language", "software")
# Groups that may drift, and the collector's extra signals by group.
DRIFTING = (VERSION, SCREEN, LANGUAGE, SOFTWARE)
_DEVICE_EXTRAS = frozenset({"hardware_concurrency", "touch", "vendor", "platform", "cores"})


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
    # Lists or tuples (a tuple is its own cache key, no copy).
    fonts: Sequence[str] = field(default_factory=list)
    plugins: Sequence[str] = field(default_factory=list)
    languages: Sequence[str] = field(default_factory=list)
    timezone: str = ""
    platform: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A fingerprint reduced to keyed digests: what the guard keeps."""

    # 32 hex characters: the keyed digest of every component.
    identity: str
    # One 8-byte keyed digest per group (DEVICE .. SOFTWARE).
    groups: tuple[bytes, ...]
    # 4-byte keyed digests of the fonts, as integers.
    fonts: frozenset[int]
    # The numbers of the browser and OS versions ("131.0.6778.85" -> (131, 0, 6778, 85)).
    version: tuple[int, ...]
    os_version: tuple[int, ...]

    def moved_back_from(self, earlier: Fingerprint) -> bool:
        """True if a version is lower than the earlier fingerprint's:
        updates only move forward, so this is not its later self."""
        return self.version < earlier.version or self.os_version < earlier.os_version


def _text(value: str, path: str, violations: Violations, max_len: int, required: bool) -> None:
    if required and not value.strip():
        violations.add(path, "required")
    elif len(value) > max_len:
        violations.add(path, f"at most {max_len} characters")
    elif not value.isprintable():
        violations.add(path, "control characters are not allowed")


def _texts(
    values: Sequence[str], path: str, violations: Violations, max_count: int, max_len: int
) -> None:
    if len(values) > max_count:
        violations.add(path, f"at most {max_count} entries")
        return
    # The common, valid case in one pass of C-level checks (this runs on
    # every new fingerprint); the per-entry loop only to say which is bad.
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
    _check_set(c.fonts, _FONT_LISTS, p + "fonts", violations, max_count=MAX_FONTS, max_len=MAX_TEXT)
    _check_set(
        c.plugins,
        _PLUGIN_LISTS,
        p + "plugins",
        violations,
        max_count=MAX_PLUGINS,
        max_len=MAX_PLUGIN,
    )
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
        violations.add(
            path,
            f"{value!r} is not an IP address (IPv4 or IPv6)"
            if value
            else "required: an IPv4 or IPv6 address",
        )


def check_identity(value: str, path: str, violations: Violations) -> None:
    if not IDENTITY.match(value):
        violations.add(path, "32 lower-case hex characters, as Evaluate returned it")


def network(client_ip: str) -> str:
    """The network a client connects from: the IPv4 address itself (carrier
    NAT puts hundreds behind one; a home has its own), or the IPv6 /64 (a
    home's or a handset's prefix; privacy addresses change inside it)."""
    if ":" not in client_ip:
        return client_ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, client_ip)
    except OSError:
        ip = ipaddress.ip_address(client_ip)
        if ip.version == 4:
            return str(ip)
        packed = ip.packed
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


def _norm(value: str) -> str:
    return " ".join(value.casefold().split())


def _numbers(version: str) -> tuple[int, ...]:
    numbers = _VERSIONS.get(version)
    if numbers is None:
        made = tuple(int(n) for n in _NUMBER.findall(version)[:6])
        numbers = remember(_VERSIONS, version, made, SET_LISTS_SIZE)
    return numbers


def _groups(c: Components, fonts: _NameSet, plugins: _NameSet) -> tuple[str, ...]:
    """The normalized components, group by group, one canonical text each.
    Sets (fonts, plugins) are sorted and deduplicated: their order is the
    browser's enumeration, not the user's. Language order is kept: it is the
    user's preference. Fields are joined by a unit separator, which
    printable components cannot contain."""
    # Sorted once, by key (keys are unique), then split between the groups.
    device_extra: list[str] = []
    software_extra: list[str] = []
    for k, v in sorted(c.extra.items()):
        (device_extra if k in _DEVICE_EXTRAS else software_extra).append(f"{k}={v.strip()}")
    sep = "\x1f"
    return (
        sep.join(
            (
                _norm(c.browser_name),
                _norm(c.os_name),
                _norm(c.platform),
                str(c.color_depth),
                *device_extra,
            )
        ),
        sep.join((c.browser_version.strip(), c.os_version.strip())),
        f"{c.screen_width}x{c.screen_height}{sep}{round(c.pixel_ratio, 2):g}",
        sep.join([_norm(c.timezone), *(_norm(x) for x in c.languages)]),
        # The fonts, "\x1e", the plugins, "\x1e", the extras, joined by sep.
        "".join(
            (
                fonts.head,
                "\x1e" + sep,
                plugins.head,
                "\x1e",
                *[sep + extra for extra in software_extra],
            )
        ),
    )


class _NameSet(NamedTuple):
    """A list of names (fonts, plugins) as a set: normalized, deduplicated
    and sorted."""

    names: tuple[str, ...]
    # Each name followed by the unit separator: its part of the software text.
    head: str


def _name_set(values: Sequence[str]) -> _NameSet:
    """The names of a valid list (printable: a space is the only blank a
    name can hold), normalized as _norm does."""
    # Casefolded whole and split in C when no name has a blank to collapse
    # or strip (nearly every list); name by name otherwise.
    joined = "\n".join(values).casefold()
    loose = " \n" in joined or "\n " in joined or joined[:1] == " " or joined[-1:] == " "
    if loose or "  " in joined:
        unique = {" ".join(v.casefold().split()) for v in values}
    else:
        unique = set(joined.split("\n")) if values else set()
    names = tuple(sorted(unique))
    return _NameSet(names, "".join([name + "\x1f" for name in names]))


# Valid font and plugin lists as sent -> their name sets. A device model
# ships one list, so thousands of fingerprints (people, or a replay's
# history) bring the same: checked and normalized once, not once per
# fingerprint. Like the validator's other caches, memory only and bounded.
_FONT_LISTS: dict[tuple[str, ...], _NameSet] = {}
_PLUGIN_LISTS: dict[tuple[str, ...], _NameSet] = {}
# Version texts -> their numbers.
_VERSIONS: dict[str, tuple[int, ...]] = {}
SET_LISTS_SIZE = 4096


def _check_set(
    values: Sequence[str],
    known: dict[tuple[str, ...], _NameSet],
    path: str,
    violations: Violations,
    *,
    max_count: int,
    max_len: int,
) -> None:
    """_texts, for a list not known valid; a valid one becomes known."""
    key = tuple(values)
    if key in known:
        return
    found = len(violations.items)
    _texts(values, path, violations, max_count, max_len)
    if len(violations.items) == found:
        remember(known, key, _name_set(key), SET_LISTS_SIZE)


def _set_of(values: Sequence[str], known: dict[tuple[str, ...], _NameSet]) -> _NameSet:
    """A valid list's name set (check() made it known, unless the cache
    was emptied since)."""
    return known.get(tuple(values)) or _name_set(values)


# Entries a digest cache holds at most (the validator's, the hashers').
CACHE_SIZE = 100_000
_V = TypeVar("_V")


def remember(cache: dict[Any, _V], key: Any, value: _V, size: int = CACHE_SIZE) -> _V:
    """Puts value in a bounded memory-only cache, emptied when full (what
    it held is made again as needed); returns value."""
    if len(cache) >= size:
        cache.clear()
    cache[key] = value
    return value


# Each group's digests are keyed apart by the group's name.
_PERSONS = tuple(name.encode() for name in GROUP_NAMES)


class _Hashers:
    """Keyed BLAKE2b under a key derived from the digest key: as keyed as
    the HMACs elsewhere, at a fraction of their cost for the ~60 fonts of a
    new fingerprint. Font digests are remembered under the process's own
    string hash of the name (no name is kept): the vocabulary is small."""

    def __init__(self, key: DigestKey) -> None:
        self.secret = key.digest("guard-fingerprint-key", "v1")
        self._fonts: dict[int, int] = {}
        # The digest sets of font name sets, under their text: a font list
        # is shared by many fingerprints (and so is its frozenset).
        self._font_sets: dict[str, frozenset[int]] = {}
        # The same for the groups that many fingerprints share (a device
        # model, a version, a screen, a language): their digests by group,
        # under the text's string hash. The software group is nearly every
        # fingerprint's own: not remembered.
        self._shared: list[dict[int, bytes]] = [{} for _ in GROUP_NAMES]
        # Keyed states per (person, size), copied for each digest: a copy
        # costs less than keying a new one (16 digests per new fingerprint).
        self._keyed: dict[tuple[bytes, int], Any] = {}

    def digest(self, data: str, person: bytes, size: int) -> bytes:
        keyed = self._keyed.get((person, size))
        if keyed is None:
            keyed = hashlib.blake2b(digest_size=size, key=self.secret, person=person)
            self._keyed[(person, size)] = keyed
        state = keyed.copy()
        state.update(data.encode())
        digest: bytes = state.digest()
        return digest

    def groups(self, texts: tuple[str, ...]) -> tuple[bytes, ...]:
        """Each group's digest."""
        digests = []
        for group, text in enumerate(texts):
            if group == SOFTWARE:
                digests.append(self.digest(text, _PERSONS[group], 8))
                continue
            known = self._shared[group]
            slot = hash(text)
            digest = known.get(slot)
            if digest is None:
                digest = remember(known, slot, self.digest(text, _PERSONS[group], 8))
            digests.append(digest)
        return tuple(digests)

    def font(self, name: str) -> int:
        slot = hash(name)
        digest = self._fonts.get(slot)
        if digest is None:
            made = int.from_bytes(self.digest(name, b"guard-font", 4), "big")
            digest = remember(self._fonts, slot, made)
        return digest

    def fonts(self, fonts: _NameSet) -> frozenset[int]:
        """The fonts' digests: the known ones looked up in one pass (C), the
        others made one by one."""
        digests = self._font_sets.get(fonts.head)
        if digests is not None:
            return digests
        names = fonts.names
        known = list(map(self._fonts.get, map(hash, names)))
        if None in known:
            for i, digest in enumerate(known):
                if digest is None:
                    known[i] = self.font(names[i])
        made = frozenset(known)
        return remember(self._font_sets, fonts.head, made, SET_LISTS_SIZE)  # type: ignore[arg-type]


@functools.cache
def _hashers(key: DigestKey) -> _Hashers:
    return _Hashers(key)


def fingerprint_of(digester: Digester, c: Components) -> Fingerprint:
    """The keyed digests of a validated fingerprint."""
    hashers = _hashers(digester.current)
    fonts = _set_of(c.fonts, _FONT_LISTS)
    texts = _groups(c, fonts, _set_of(c.plugins, _PLUGIN_LISTS))
    identity = hashers.digest("\x1d".join(texts), b"guard-identity", 16).hex()
    groups = hashers.groups(texts)
    return Fingerprint(
        identity=identity,
        groups=groups,
        fonts=hashers.fonts(fonts),
        version=_numbers(c.browser_version),
        os_version=_numbers(c.os_version),
    )


# "A few fonts" added or removed (an installed font, an anti-detect
# browser's noise) keep a font set the same set: on a phone's nine fonts
# three changes fall below the Jaccard similarity that tells a desktop's
# hundred fonts from another's. A few, and fewer than half as many as
# stayed: three fonts with two of them new are another set.
FONTS_FEW = 3


def fonts_alike(a: frozenset[int], b: frozenset[int], similarity: float) -> bool:
    """Whether two font sets are one set that drifted: a few fonts apart,
    or their Jaccard similarity reaches `similarity`."""
    if len(a) > len(b):
        a, b = b, a
    shared = len(a) - len(a - b)
    differ = len(a) + len(b) - 2 * shared
    if differ <= FONTS_FEW and shared >= 2 * differ:
        return True
    return shared >= similarity * (differ + shared)


class FingerprintCache:
    """Fingerprints of recently seen, already validated component sets, keyed
    by a digest of their serialized form: a browser that comes back with the
    same components skips validation and hashing. Holds no raw component."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._entries: dict[bytes, Fingerprint] = {}

    def get(self, key: bytes) -> Fingerprint | None:
        return self._entries.get(key) if key else None

    def put(self, key: bytes, value: Fingerprint) -> None:
        if key:
            remember(self._entries, key, value, self._size)
