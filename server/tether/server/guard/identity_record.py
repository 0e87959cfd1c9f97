"""The identity book's durable record: what a call taught the book, as rows
for the recorder, and the book rebuilt from those rows at start.

Only keyed digests are written: fingerprints (guard_fingerprints), the links
and merges the book made and operators' corrections, in order
(guard_fingerprint_links), and the hours a fingerprint was seen from a
network (guard_sightings), from which popularity, rates and crowds are
learned again. Sightings older than the book's horizon are not read, and
are deleted as they age.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, select

from tether.server import logs
from tether.server.guard.fingerprint import Fingerprint
from tether.server.guard.identities import HORIZON, JOINING, IdentityBook, Link, LinkKind
from tether.server.guard.recorder import Change, Sighting
from tether.server.guard.signals import HOUR
from tether.server.guard.tables import GuardFingerprint, GuardLinkRecord, GuardSighting
from tether.server.storage.database import Database

log = logs.get(__name__)

UNLINK = "unlink"
# How far back each follow() reads fingerprints again, and a sweep (see
# follow).
FOLLOW_OVERLAP = timedelta(seconds=1)
SWEEP_OVERLAP = timedelta(minutes=10)
LINK_ID_WINDOW = 1000
# Rows per IN list of a follow() read.
FOLLOW_CHUNK = 5000
# Rows per part of a streamed read.
READ_PART = 1000
# Forgotten names per part read at start.
FORGOTTEN_PART = 10_000

_T = TypeVar("_T")


def _time(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def digests(fp: Fingerprint) -> dict[str, Any]:
    return {
        "groups": [group.hex() for group in fp.groups],
        "fonts": sorted(fp.fonts),
        "version": list(fp.version),
        "os_version": list(fp.os_version),
    }


def fingerprint_from(identity: str, value: dict[str, Any]) -> Fingerprint:
    return Fingerprint(
        identity=identity,
        groups=tuple(bytes.fromhex(group) for group in value["groups"]),
        fonts=frozenset(int(f) for f in value["fonts"]),
        version=tuple(value["version"]),
        os_version=tuple(value["os_version"]),
    )


def link_row(link: Link, actor: str = "", reason: str = "") -> dict[str, Any]:
    return {
        "kind": link.kind,
        "source": link.source,
        "target": link.target,
        "confidence": link.confidence,
        "changed": list(link.changed),
        "actor": actor,
        "reason": reason,
        "create_time": _time(link.time),
    }


class OncePerHour:
    """Which keys this process recorded in the current hour, so what a
    returning browser repeats reaches SQL at most hourly."""

    def __init__(self) -> None:
        self._hour = -1
        self._recorded: set[object] = set()

    def first(self, key: object, t: float) -> bool:
        """Whether `key` is new this hour (and now recorded)."""
        hour = math.floor(t / HOUR)
        if hour != self._hour:
            self._hour = hour
            self._recorded.clear()
        if key in self._recorded:
            return False
        self._recorded.add(key)
        return True


class Sightings(OncePerHour):
    """(fingerprint, network) pairs: one sighting row per hour, with the
    minute of the hour's first (the book counts rates in 10-minute slots)."""

    def new(self, fingerprint: str, network: str, t: float) -> Sighting | None:
        if not self.first((fingerprint, network), t):
            return None
        return (fingerprint, network, math.floor(t / HOUR), math.floor(t % HOUR / 60))


SIGHTING_COLUMNS = (
    GuardSighting.fingerprint,
    GuardSighting.network,
    GuardSighting.hour,
    GuardSighting.minute,
)


def sighting_time(hour: int, minute: int) -> float:
    """When a recorded sighting was: the middle of its minute."""
    return hour * HOUR + minute * 60 + 30


def learned(
    change: Change,
    fp: Fingerprint,
    *,
    links: tuple[Link, ...],
    new: bool,
    merges: list[Link],
    sighting: Sighting | None,
    network: str,
    t: float,
) -> None:
    """Adds to `change` what a call from `network` taught the book: a new
    fingerprint's row, or a known one's last sighting (its time and network)."""
    if new or sighting is not None:
        change.fingerprints.append(
            {
                "fingerprint": fp.identity,
                "digests": digests(fp),
                "first_seen_time": _time(t),
                "last_seen_time": _time(t),
                "last_network": network,
            }
        )
    if new and links and links[0].source == fp.identity:
        change.link_records.append(link_row(links[0]))
    change.link_records.extend(link_row(merge) for merge in merges)
    if sighting is not None:
        change.sightings.add(sighting)


@dataclass
class Watermarks:
    """How far a book has read the record: what follow() reads after."""

    # The newest first_seen_time read.
    fingerprints: datetime | None = None
    # Link records applied (or read and passed over), by id; ids below
    # `floor` are all done.
    links: set[int] = field(default_factory=set)
    floor: int = 0

    def read_fingerprint(self, first_seen: datetime) -> None:
        """A fingerprint row first seen then was read."""
        if self.fingerprints is None or first_seen > self.fingerprints:
            self.fingerprints = first_seen


async def load(db: Database, book: IdentityBook, now: float) -> tuple[int, Watermarks]:
    """Rebuilds the book from the record; returns the fingerprints read and
    where follow() starts."""
    oldest = math.floor((now - HORIZON) / HOUR)
    held_since = _time(now - book.forget_after)
    async with db.sessions() as session:
        # Oldest first, the order in which the book looks at them for forgetting.
        fingerprints = (
            await session.scalars(
                select(GuardFingerprint)
                .where(GuardFingerprint.last_seen_time >= held_since)
                .order_by(GuardFingerprint.last_seen_time)
            )
        ).all()
        marks = Watermarks()
        for row in fingerprints:
            _restore_fingerprint(book, row, marks)
        # Those the book would have forgotten by now: their names, read in
        # parts (a long-running service has millions, a few bytes each in
        # the book, and a list of them all would hold ~80 bytes each).
        forgotten = 0
        names = await session.stream(
            select(GuardFingerprint.fingerprint, GuardFingerprint.first_seen_time)
            .where(GuardFingerprint.last_seen_time < held_since)
            .execution_options(yield_per=FORGOTTEN_PART)
        )
        async for part in names.partitions():
            for name, first_seen in part:
                book.restore_forgotten(name)
                marks.read_fingerprint(first_seen)
            forgotten += len(part)
        records = (
            await session.scalars(
                select(GuardLinkRecord).order_by(GuardLinkRecord.create_time, GuardLinkRecord.id)
            )
        ).all()
        sightings = (
            await session.execute(
                select(*SIGHTING_COLUMNS)
                .where(GuardSighting.hour >= oldest)
                .order_by(GuardSighting.hour, GuardSighting.minute)
            )
        ).all()
    for record in records:
        t = record.create_time.timestamp()
        if record.kind == UNLINK:
            book.unlink(record.source)
        elif record.kind == LinkKind.OPERATOR_MERGE:
            book.merge(record.target, record.source, t)
        else:
            book.restore_link(_link_of(record))
        marks.links.add(record.id)
    marks.floor = max(marks.links, default=0) - LINK_ID_WINDOW
    marks.links = {i for i in marks.links if i > marks.floor}
    for fingerprint, network, hour, minute in sightings:
        book.restore_sighting(fingerprint, network, sighting_time(hour, minute))
    return len(fingerprints) + forgotten, marks


def _restore_fingerprint(book: IdentityBook, row: GuardFingerprint, marks: Watermarks) -> None:
    book.restore_fingerprint(
        fingerprint_from(row.fingerprint, row.digests),
        row.first_seen_time.timestamp(),
        row.last_seen_time.timestamp(),
        row.last_network,
    )
    marks.read_fingerprint(row.first_seen_time)


def _link_of(record: GuardLinkRecord) -> Link:
    return Link(
        record.kind,
        record.source,
        record.target,
        record.confidence,
        tuple(record.changed),
        record.create_time.timestamp(),
    )


async def follow(
    db: Database,
    book: IdentityBook,
    marks: Watermarks,
    now: float,
    *,
    look_back: timedelta = FOLLOW_OVERLAP,
) -> int:
    """Brings into the book what other processes (workers, replicas) taught
    theirs since the last read: new fingerprints, links and merges, and
    operators' corrections, and where the new fingerprints were seen.
    Returns the records applied.

    Rows commit out of the order of their times and ids (a transaction that
    took longer), so each read looks `look_back` (and LINK_ID_WINDOW ids)
    back again and skips what it already has. A link whose fingerprints are
    not here yet brings them along, read by name: a fingerprint and its link
    commit together, but the two reads need not see the same commits, and a
    late commit can fall behind the overlap. A fingerprint with no link
    that committed later than that (a stalled writer) waits for a sweep: a
    read that looks SWEEP_OVERLAP back (book_follower, every minute).
    A link this book decided otherwise (its source already joined elsewhere
    here) is passed over: both books stay as they were, and a restart
    agrees. Later sightings of fingerprints already known here (rates,
    popularity) stay each process's own until its next start.
    """
    records, fingerprints = await _read_new(db, book, marks, look_back)
    records.sort(key=lambda record: record.id)
    learned = [row.fingerprint for row in fingerprints if not book.knows(row.fingerprint)]
    for row in fingerprints:
        _restore_fingerprint(book, row, marks)
    if learned:
        # Where the new fingerprints were seen: what drift links weigh.
        oldest = math.floor((now - HORIZON) / HOUR)
        sightings: list[Any] = []
        async with db.sessions() as session:
            for names in _chunks(learned):
                sightings += await session.execute(
                    select(*SIGHTING_COLUMNS)
                    .where(GuardSighting.fingerprint.in_(names), GuardSighting.hour >= oldest)
                    .order_by(GuardSighting.hour, GuardSighting.minute)
                )
        # In time order across the parts, as each part read them.
        sightings.sort(key=lambda row: (row[2], row[3]))
        for fingerprint, network, hour, minute in sightings:
            book.restore_sighting(fingerprint, network, sighting_time(hour, minute))
    applied = len(learned)
    for record in records:
        if record.id in marks.links:
            continue
        marks.links.add(record.id)
        applied += _apply_followed(book, record)
    if marks.links:
        marks.floor = max(marks.floor, max(marks.links) - LINK_ID_WINDOW)
        marks.links = {i for i in marks.links if i > marks.floor}
    return applied


async def _read_new(
    db: Database, book: IdentityBook, marks: Watermarks, look_back: timedelta
) -> tuple[list[GuardLinkRecord], list[GuardFingerprint]]:
    """The link records not applied here yet, and the fingerprints this book
    lacks: those first seen since the watermark, and those the records name."""
    since = marks.fingerprints - look_back if marks.fingerprints is not None else None
    recent = select(GuardFingerprint.fingerprint, GuardFingerprint.first_seen_time)
    if since is not None:
        recent = recent.where(GuardFingerprint.first_seen_time >= since)
    # Names and ids first (cheap), whole rows only for what is new here.
    async with db.sessions() as session:
        unseen = [
            i
            for i in await session.scalars(
                select(GuardLinkRecord.id).where(GuardLinkRecord.id > marks.floor)
            )
            if i not in marks.links
        ]
        records: list[GuardLinkRecord] = []
        for ids in _chunks(unseen):
            records += await session.scalars(
                select(GuardLinkRecord).where(GuardLinkRecord.id.in_(ids))
            )
        unknown: dict[str, None] = {}
        # In parts, each fetched on its own: a sweep reads every name of the
        # last minutes, and one read of them all would hold the loop (about
        # 0.2 s for 100,000 names).
        result = await session.stream(recent.execution_options(yield_per=READ_PART))
        async for part in result.partitions():
            for name, first_seen in part:
                marks.read_fingerprint(first_seen)
                if not book.knows(name):
                    unknown[name] = None
        for record in records:
            for name in (record.source, record.target):
                if name and not book.knows(name):
                    unknown[name] = None
        fingerprints: list[GuardFingerprint] = []
        for names in _chunks(list(unknown)):
            fingerprints += await session.scalars(
                select(GuardFingerprint).where(GuardFingerprint.fingerprint.in_(names))
            )
    return records, fingerprints


async def seen_times(db: Database, names: list[str]) -> dict[str, tuple[float, float]]:
    """When each recorded fingerprint of `names` was first and last seen
    (what the book no longer holds of one it forgot by name); a name never
    recorded is absent."""
    times: dict[str, tuple[float, float]] = {}
    async with db.sessions() as session:
        for part in _chunks(names):
            rows = await session.execute(
                select(
                    GuardFingerprint.fingerprint,
                    GuardFingerprint.first_seen_time,
                    GuardFingerprint.last_seen_time,
                ).where(GuardFingerprint.fingerprint.in_(part))
            )
            for name, first_seen, last_seen in rows:
                times[name] = (first_seen.timestamp(), last_seen.timestamp())
    return times


def _chunks(items: list[_T]) -> list[list[_T]]:
    """IN lists of at most FOLLOW_CHUNK values."""
    return [items[start : start + FOLLOW_CHUNK] for start in range(0, len(items), FOLLOW_CHUNK)]


def _apply_followed(book: IdentityBook, record: GuardLinkRecord) -> int:
    """Applies another process's record unless this book already has it."""
    if _here_already(book, record):
        return 0
    if record.kind == UNLINK:
        book.unlink(record.source)
        return 1
    if record.kind == LinkKind.OPERATOR_MERGE:
        return int(book.merge(record.target, record.source, record.create_time.timestamp()))
    book.restore_link(_link_of(record))
    return 1


def _here_already(book: IdentityBook, record: GuardLinkRecord) -> bool:
    """Whether the book has the record already, or decided otherwise: a
    fingerprint's link applies only to a fingerprint that stands alone here."""
    source = record.source
    merge = record.kind in JOINING
    if not (merge or book.knows(source)):
        return True
    alone = book.find(source) == source and book.members(source) == [source]
    if record.kind == UNLINK:
        return alone
    if book.find(source) == book.find(record.target):
        return True
    return not (merge or alone)


async def forget_old_sightings(db: Database, now: float) -> None:
    oldest = math.floor((now - HORIZON) / HOUR)
    async with db.transaction() as session:
        await session.execute(delete(GuardSighting).where(GuardSighting.hour < oldest))
