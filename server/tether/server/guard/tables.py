"""SQL tables of the fingerprint guard.

Redis holds the live counters; SQL holds what must survive Redis: the
policies, every counted entry (so the counters can be rebuilt), and the
links between identities and accounts for look-ups. Accounts appear only as
keyed digests, fingerprints only as identities and per-component digests.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Index, Integer, LargeBinary, String
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
    identity: Mapped[str] = mapped_column(String(32), primary_key=True)
    # The 8-byte Redis member (a prefix of account_digest).
    member: Mapped[bytes] = mapped_column(LargeBinary(8), primary_key=True)
    # When the entry stops counting; None: never (registration without window).
    expire_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


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


class GuardIdentity(Base):
    """An identity's per-component keyed digests, kept for linking a
    drifting fingerprint to its earlier self later (docs/guard.md)."""

    __tablename__ = "guard_identities"

    identity: Mapped[str] = mapped_column(String(32), primary_key=True)
    # component name -> 16 hex characters of its keyed digest.
    sketch: Mapped[dict[str, str]] = mapped_column(JSON)
    first_seen_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
