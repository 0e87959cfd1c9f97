"""The guard's Redis key formats.

One hash per (service, bucket, action) holds the accounts counted for the
identities of one bucket: one field per identity (and room), its value a
packed record (guard/scripts.py describes it). The bucket, the identity's
first `bits` bits (TETHER_GUARD_BUCKET_BITS), is the hash tag, so in Redis
Cluster the keys spread over the slots while every key of one identity
(all its actions and rooms) shares one. A backtest passes a scope of its
own, so its keys never meet the live ones.
"""

from __future__ import annotations

from tether.server.counters.connection import KEY_PREFIX as PREFIX

ACTION_LETTERS = {"register": "r", "login": "l", "collaborate": "c"}
# The key layout's version: the restore marker names it (guard/restorer.py),
# so the first server of a new layout finds no marker and writes its
# layout from SQL.
LAYOUT = 2
# Keys of layout 1 (a hash per identity, action and room, the identity
# last): what no server of this layout reads.
LAYOUT_1 = f"{PREFIX}:g:*}}:?:*"


def bucket(identity: str, bits: int) -> str:
    """The hash tag of an identity (32 hex characters): its first `bits` bits, in hex."""
    return format(int(identity[:8], 16) >> (32 - bits), "x")


def counted(
    service_id: str, action: str, room_id: str, identity: str, *, bits: int, scope: str = "g"
) -> str:
    """The hash holding one identity's counted accounts for an action (and
    those of the other identities of its bucket). Rooms share it: the room
    is part of the field (field() below)."""
    letter = ACTION_LETTERS[action]
    return f"{PREFIX}:{scope}:{service_id}:{{{bucket(identity, bits)}}}:{letter}"


def field(identity: str, room_id: str = "") -> bytes:
    """An identity's field in its bucket's hash: its 16 bytes, then the room."""
    return bytes.fromhex(identity) + room_id.encode()


def spills(key: str, field: bytes) -> list[str]:
    """A spilled identity's own keys (guard/scripts.py): its accounts' hash,
    their expiries and their admissions. Named after its bucket's hash and
    field, so they share its slot; no name of layout 1 (LAYOUT_1) matches."""
    tail = field.hex()
    return [f"{key}s:{tail}", f"{key}x:{tail}", f"{key}t:{tail}"]


def is_registrations(key: str) -> bool:
    """Whether a counted() key holds registrations (which keep their day's
    admission times for the velocity windows)."""
    return key.endswith(":" + ACTION_LETTERS["register"])


def backtest_scope(run_id: str) -> str:
    """The key scope of one backtest run: nothing live is under it."""
    return f"bt:{run_id}"


def backtest_running(run_id: str) -> str:
    """Set while the run goes on (in any process): its scope is not a leftover."""
    return f"bt-running:{run_id}"
