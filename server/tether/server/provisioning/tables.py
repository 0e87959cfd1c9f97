"""SQL tables of the provisioning area: the outbox of instructions to
partners, the entitlements devices see, their per-device change feed, and
usage.

Accounts and devices appear only as keyed digests, as in the binding area.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Date,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.storage.base import Base, UtcDateTime, utcnow

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Instruction kinds and states, as stored.
OPEN = "open"
CLOSE = "close"
PENDING = "pending"
LEASED = "leased"
CONFIRMED = "confirmed"
FAILED = "failed"
DEAD = "dead"
INSTRUCTION_STATES = (PENDING, LEASED, CONFIRMED, FAILED, DEAD)

# Entitlement states, as stored.
ACTIVATING = "activating"
ACTIVE = "active"
REVOKED = "revoked"


class Instruction(Base):
    """One instruction to a partner: the transactional outbox row.

    Written in the transaction of the binding change that causes it, so a
    binding never exists without its instruction. Its id is what the partner
    confirms, however often it is delivered.
    """

    __tablename__ = "provisioning_instructions"
    __table_args__ = (
        # The lease query: a partner's deliverable rows in delivery order, so
        # it stops after `limit` rows however large the backlog.
        Index(
            "ix_provisioning_instructions_deliverable",
            "partner_id",
            "seq",
            postgresql_where=text("state IN ('pending', 'leased')"),
            sqlite_where=text("state IN ('pending', 'leased')"),
        ),
        # The pipeline view counts per partner and state.
        Index("ix_provisioning_instructions_partner_state", "partner_id", "state"),
        Index("ix_provisioning_instructions_binding_id", "binding_id"),
    )

    # Delivery order within a partner; also the pipeline listing's key.
    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instruction_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True, default=uuid.uuid4)
    partner_id: Mapped[str] = mapped_column(ForeignKey("partners.partner_id", ondelete="CASCADE"))
    service_id: Mapped[str] = mapped_column(String(63))
    binding_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    kind: Mapped[str] = mapped_column(String(8))
    partner_reference: Mapped[str] = mapped_column(String(128), default="")
    account_kind: Mapped[str] = mapped_column(String(16))
    account_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    state: Mapped[str] = mapped_column(String(12), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # pending: deliverable from this time on; leased: the lease ends then.
    due_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The stream (or "fetch:<credential>") holding the lease.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str] = mapped_column(String(500), default="")
    partner_service_reference: Mapped[str] = mapped_column(String(128), default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The W3C traceparent of the call that wrote it (a report, an unbind),
    # when that call was traced: its delivery's span links back to it. "": none.
    trace_parent: Mapped[str] = mapped_column(String(55), default="", server_default="")


class Entitlement(Base):
    """Whether one service of one binding may be used on the bound device."""

    __tablename__ = "entitlements"
    __table_args__ = (
        Index("ix_entitlements_lookup", "partner_id", "service_id", "account_digest"),
    )

    binding_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("bindings.binding_id", ondelete="CASCADE"), primary_key=True
    )
    service_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    partner_id: Mapped[str] = mapped_column(String(63))
    account_kind: Mapped[str] = mapped_column(String(16))
    account_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    device_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    state: Mapped[str] = mapped_column(String(12), default=ACTIVATING)
    reason: Mapped[str] = mapped_column(String(500), default="")
    update_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class DeviceFeed(Base):
    """The last position of a device's entitlement feed.

    Writers bump it with an upsert that holds the row lock until commit, so
    a device's events commit in position order and a watcher reading
    "after position N" can never miss one that commits late.
    """

    __tablename__ = "entitlement_feeds"

    device_digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    last_position: Mapped[int] = mapped_column(BigInteger, default=0)


class EntitlementEvent(Base):
    """One change of an entitlement, at its position in the device's feed."""

    __tablename__ = "entitlement_events"

    device_digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    binding_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    partner_id: Mapped[str] = mapped_column(String(63))
    service_id: Mapped[str] = mapped_column(String(63))
    account_kind: Mapped[str] = mapped_column(String(16))
    account_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    state: Mapped[str] = mapped_column(String(12))
    reason: Mapped[str] = mapped_column(String(500), default="")
    event_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class UsageRecord(Base):
    """One usage event reported by a device or a partner."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_partner_day", "partner_id", "day"),
        Index("ix_usage_records_device_day", "device_digest", "day"),
        Index("ix_usage_records_binding_id", "binding_id"),
    )

    record_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    partner_id: Mapped[str] = mapped_column(ForeignKey("partners.partner_id", ondelete="CASCADE"))
    service_id: Mapped[str] = mapped_column(String(63))
    binding_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    account_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    device_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    # "device" or "partner".
    source: Mapped[str] = mapped_column(String(8))
    metric: Mapped[str] = mapped_column(String(63))
    quantity: Mapped[int] = mapped_column(BigInteger)
    occur_time: Mapped[datetime] = mapped_column(UtcDateTime)
    # The UTC day of occur_time: per-day sums without dialect-specific SQL.
    day: Mapped[date] = mapped_column(Date)


class UsageAnswer(Base):
    """The partner's last live usage answer: the device's last known figures."""

    __tablename__ = "usage_answers"

    binding_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("bindings.binding_id", ondelete="CASCADE"), primary_key=True
    )
    service_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    # JSON list of {"metric": ..., "quantity": ...}.
    figures: Mapped[str] = mapped_column(Text)
    period: Mapped[str] = mapped_column(String(100), default="")
    answer_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
