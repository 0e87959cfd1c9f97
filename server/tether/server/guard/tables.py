"""SQL tables of the fingerprint guard.

Redis holds the live counters; SQL holds what must survive Redis and
restarts: the policies, every counted entry (so the counters can be
rebuilt), the identity-account links for look-ups, and what the identity
book learned (fingerprints as keyed digests, the links and merges between
them, operators' corrections, and where fingerprints were seen). Accounts
appear only as keyed digests, networks only as keyed digests.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, LargeBinary, SmallInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.storage.base import Base, UtcDateTime, utcnow


class GuardPolicy(Base):
    """One guarded service's rules (see tether.guard.v1.Policy)."""

    __tablename__ = "guard_policies"

    service_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))
    register_limit: Mapped[int] = mapped_column(Integer)
    register_window_seconds: Mapped[int] = mapped_column(BigInteger)
    login_limit: Mapped[int] = mapped_column(Integer)
    login_session_seconds: Mapped[int] = mapped_column(BigInteger)
    collaborate_limit: Mapped[int] = mapped_column(Integer)
    room_membership_seconds: Mapped[int] = mapped_column(BigInteger)
    redis_failure: Mapped[str] = mapped_column(String(16))
    # Lists of hex strings; small (at most 1,000 each), read whole.
    allowed_account_digests: Mapped[list[str]] = mapped_column(JSON)
    allowed_identities: Mapped[list[str]] = mapped_column(JSON)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class GuardEntry(Base):
    """One account counted for one identity: the durable copy of a Redis
    set member, from which RebuildCounters restores the counters."""

    __tablename__ = "guard_entries"

    service_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    # "register", "login" or "collaborate".
    action: Mapped[str] = mapped_column(String(16), primary_key=True)
    # The room for "collaborate"; "" otherwise.
    room_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # The fingerprint the account was counted through; its identity now
    # is the book's (a rebuild counts it there).
    identity: Mapped[str] = mapped_column(String(32), primary_key=True)
    # The 8-byte Redis member (a prefix of account_digest).
    member: Mapped[bytes] = mapped_column(LargeBinary(8), primary_key=True)
    # When the entry stops counting; None: never (registration without window).
    expire_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The network (keyed digest, 16 hex characters) it was counted from;
    # empty for entries recorded before networks were.
    network: Mapped[str] = mapped_column(String(16), default="", server_default="")


class GuardLink(Base):
    """An identity and an account seen together: the look-ups' table."""

    __tablename__ = "guard_links"
    __table_args__ = (
        Index("ix_guard_links_identity", "identity", "last_seen_time"),
        Index("ix_guard_links_account", "account_digest", "last_seen_time"),
    )

    service_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    identity: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16))
    last_action: Mapped[str] = mapped_column(String(16))
    first_seen_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class GuardFingerprint(Base):
    """A fingerprint the guard has seen, as keyed digests (what linking
    compares; guard/fingerprint.py)."""

    __tablename__ = "guard_fingerprints"
    # What the book follower reads since its last read (identity_record.follow).
    __table_args__ = (Index("ix_guard_fingerprints_first_seen_time", "first_seen_time"),)

    fingerprint: Mapped[str] = mapped_column(String(32), primary_key=True)
    # {"groups": [16 hex x 5], "fonts": [int], "version": [int], "os_version": [int]}
    digests: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_seen_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The network it was last seen on (keyed digest, as guard_sightings
    # keeps it): who a farm back on its own network could be, after a
    # restart too. Empty for rows from before it was kept.
    last_network: Mapped[str] = mapped_column(String(16), default="", server_default="")


class GuardLinkRecord(Base):
    """A link (a fingerprint joining an identity) or a merge (an identity
    joining another), in the order they were made; the book replays them."""

    __tablename__ = "guard_fingerprint_links"
    __table_args__ = (Index("ix_guard_fingerprint_links_time", "create_time"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    # identities.LinkKind, or "unlink" (an operator's split of `source`).
    kind: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(32))
    confidence: Mapped[float] = mapped_column(Float)
    # The component groups that differed.
    changed: Mapped[list[str]] = mapped_column(JSON)
    # Operators' corrections: who and why; empty for the book's own links.
    actor: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(String(512), default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class GuardSighting(Base):
    """A fingerprint seen from a network within an hour: what the book's
    rates, popularity and crowds are rebuilt from at start."""

    __tablename__ = "guard_sightings"
    __table_args__ = (Index("ix_guard_sightings_hour", "hour"),)

    fingerprint: Mapped[str] = mapped_column(String(32), primary_key=True)
    network: Mapped[str] = mapped_column(String(16), primary_key=True)
    # Unix time // 3600.
    hour: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The minute of the hour's first sighting: the book's rates count
    # 10-minute slots. Rows from before it was kept say 30.
    minute: Mapped[int] = mapped_column(SmallInteger, default=30, server_default="30")


class GuardFarmed(Base):
    """An identity refused as one browser (for one service and action): it
    is being farmed, and every network counts for it from then on. Kept so
    a rebuild restores that."""

    __tablename__ = "guard_farmed"

    service_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    action: Mapped[str] = mapped_column(String(16), primary_key=True)
    room_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    identity: Mapped[str] = mapped_column(String(32), primary_key=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
