"""Operators' corrections of the identity book: split a fingerprint from the
identity a link tied it to, or merge two identities known to be one browser.

Each correction is recorded (guard_fingerprint_links, with who and why) and
replayed after the links it corrects whenever the book is rebuilt, and the
counters of the identities involved are rewritten from SQL, so the
correction also holds through RebuildCounters.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import select

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors
from tether.server.errors import Violations
from tether.server.guard import identity_record, keys, rebuild
from tether.server.guard.decide import ACTIONS
from tether.server.guard.fingerprint import check_identity
from tether.server.guard.identities import Link, LinkKind
from tether.server.guard.recorder import Change
from tether.server.guard.service import Guard
from tether.server.guard.tables import GuardEntry

MAX_REASON = 512


class Member(NamedTuple):
    fingerprint: str
    link: Link | None
    first_seen: float
    last_seen: float


class IdentityView(NamedTuple):
    identity: str
    members: list[Member]
    merges: list[Link]
    popularity: int


def _check(values: dict[str, str], reason: str) -> None:
    violations = Violations()
    for path, value in values.items():
        check_identity(value, path, violations)
    if len(reason) > MAX_REASON:
        violations.add("reason", f"at most {MAX_REASON} characters")
    elif not reason.isprintable():
        violations.add("reason", "control characters are not allowed")
    violations.raise_if_any()


async def _known(guard: Guard, value: str, what: str) -> None:
    """NOT_FOUND unless the guard has seen the fingerprint or identity (a
    name the book forgot without a link, SQL confirms: the book's filter
    of such names may take a name never seen for one of them)."""
    book = guard.book
    if book.surely_knows(value):
        return
    if book.knows(value) and await identity_record.seen_times(guard.db, [value]):
        return
    raise errors.NotFound(
        ErrorReason.ERROR_REASON_GUARD_IDENTITY_NOT_FOUND,
        f"the guard has never seen {what} {value}",
    )


async def explain(guard: Guard, identity: str) -> IdentityView:
    _check({"identity": identity}, "")
    await _known(guard, identity, "identity")
    book = guard.book
    root = book.find(identity)
    names = book.members(root)
    seen = {name: times for name in names if (times := book.seen(name)) is not None}
    if len(seen) < len(names):
        # Forgotten without a link: the book kept only their names.
        seen |= await identity_record.seen_times(
            guard.db, [name for name in names if name not in seen]
        )
    members = [Member(name, book.link_of(name), *seen.get(name, (0.0, 0.0))) for name in names]
    members.sort(key=lambda m: m.first_seen)
    return IdentityView(root, members, book.merges_into(root), book.popularity(root))


async def unlink(guard: Guard, fingerprint: str, reason: str, actor: str) -> tuple[str, str]:
    """Returns (the fingerprint's identity now, the identity it left)."""
    _check({"fingerprint": fingerprint}, reason)
    await _known(guard, fingerprint, "fingerprint")
    book = guard.book
    previous = book.find(fingerprint)
    if previous == fingerprint and book.members(previous) == [fingerprint]:
        return fingerprint, previous
    rest = book.unlink(fingerprint)
    t = guard.clock()
    record = Link(identity_record.UNLINK, fingerprint, previous, 1.0, (), t)
    await guard.recorder.commit(
        Change(link_records=[identity_record.link_row(record, actor, reason)])
    )
    await _recount(guard, {previous, fingerprint, rest}, {fingerprint, rest})
    return fingerprint, rest


async def merge(guard: Guard, identity: str, other: str, reason: str, actor: str) -> str:
    """Returns the identity both resolve to."""
    _check({"identity": identity, "other": other}, reason)
    await _known(guard, identity, "identity")
    await _known(guard, other, "identity")
    book = guard.book
    keep, gone = book.find(identity), book.find(other)
    if keep == gone:
        return keep
    t = guard.clock()
    book.merge(keep, gone, t)
    record = Link(LinkKind.OPERATOR_MERGE, gone, keep, 1.0, (), t)
    await guard.recorder.commit(
        Change(link_records=[identity_record.link_row(record, actor, reason)])
    )
    await _recount(guard, {keep, gone}, {keep})
    return keep


async def _recount(guard: Guard, old: set[str], new: set[str]) -> None:
    """Clears the counters of the identities as they were, and writes those
    of the identities as they are now back from SQL."""
    await guard.recorder.flush()
    fingerprints = {m for identity in old | new for m in guard.book.members(identity)} | old
    async with guard.db.sessions() as session:
        scopes = (
            await session.execute(
                select(GuardEntry.service_id, GuardEntry.action, GuardEntry.room_id)
                .where(GuardEntry.identity.in_(fingerprints))
                .distinct()
            )
        ).all()
    stale = [
        (guard.decider.key(service, action, room, identity), keys.field(identity, room))
        for service, action, room in scopes
        for identity in old | new
        if action in ACTIONS
    ]
    await guard.counters.remove_fields(stale)
    await rebuild.rebuild(guard, identities={guard.book.find(i) for i in new})
