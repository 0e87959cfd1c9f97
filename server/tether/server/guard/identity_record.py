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
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from tether.server import logs
from tether.server.guard.fingerprint import Fingerprint
from tether.server.guard.identities import HORIZON, IdentityBook, Link, LinkKind
from tether.server.guard.recorder import Change
from tether.server.guard.signals import HOUR
from tether.server.guard.tables import GuardFingerprint, GuardLinkRecord, GuardSighting
from tether.server.storage.database import Database

log = logs.get(__name__)

UNLINK = "unlink"


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
    """(fingerprint, network) pairs: one sighting row per hour."""

    def new(self, fingerprint: str, network: str, t: float) -> tuple[str, str, int] | None:
        if not self.first((fingerprint, network), t):
            return None
        return (fingerprint, network, math.floor(t / HOUR))


def learned(
    change: Change,
    fp: Fingerprint,
    *,
    links: tuple[Link, ...],
    new: bool,
    merges: list[Link],
    sighting: tuple[str, str, int] | None,
    t: float,
) -> None:
    """Adds to `change` what a call taught the book."""
    if new:
        change.fingerprints.append(
            {
                "fingerprint": fp.identity,
                "digests": digests(fp),
                "first_seen_time": _time(t),
                "last_seen_time": _time(t),
            }
        )
        if links and links[0].source == fp.identity:
            change.link_records.append(link_row(links[0]))
    change.link_records.extend(link_row(merge) for merge in merges)
    if sighting is not None:
        if not new:
            change.fingerprints.append(
                {
                    "fingerprint": fp.identity,
                    "digests": digests(fp),
                    "first_seen_time": _time(t),
                    "last_seen_time": _time(t),
                }
            )
        change.sightings.add(sighting)


async def load(db: Database, book: IdentityBook, now: float) -> int:
    """Rebuilds the book from the record; returns the fingerprints read."""
    oldest = math.floor((now - HORIZON) / HOUR)
    async with db.sessions() as session:
        fingerprints = (await session.scalars(select(GuardFingerprint))).all()
        records = (
            await session.scalars(
                select(GuardLinkRecord).order_by(GuardLinkRecord.create_time, GuardLinkRecord.id)
            )
        ).all()
        sightings = (
            await session.execute(
                select(GuardSighting.fingerprint, GuardSighting.network, GuardSighting.hour)
                .where(GuardSighting.hour >= oldest)
                .order_by(GuardSighting.hour)
            )
        ).all()
    for row in fingerprints:
        book.restore_fingerprint(
            fingerprint_from(row.fingerprint, row.digests),
            row.first_seen_time.timestamp(),
            row.last_seen_time.timestamp(),
            "",
        )
    for record in records:
        t = record.create_time.timestamp()
        if record.kind == UNLINK:
            book.unlink(record.source)
        elif record.kind == LinkKind.OPERATOR_MERGE:
            book.merge(record.target, record.source, t)
        else:
            book.restore_link(
                Link(
                    record.kind,
                    record.source,
                    record.target,
                    record.confidence,
                    tuple(record.changed),
                    t,
                )
            )
    for fingerprint, network, hour in sightings:
        book.restore_sighting(fingerprint, network, hour * HOUR + HOUR / 2)
    return len(fingerprints)


async def forget_old_sightings(db: Database, now: float) -> None:
    oldest = math.floor((now - HORIZON) / HOUR)
    async with db.transaction() as session:
        await session.execute(delete(GuardSighting).where(GuardSighting.hour < oldest))
