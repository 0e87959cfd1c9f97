"""SQL tables of eligible-account lists and bindings.

Accounts and devices appear only as keyed digests (see tether.server.shared.digests).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, LargeBinary, String, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.storage.base import Base, UtcDateTime, utcnow

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class EligibleAccount(Base):
    """One account on one partner's list of accounts eligible for binding."""

    __tablename__ = "eligible_accounts"
    __table_args__ = (
        Index("uq_eligible_accounts_partner_digest", "partner_id", "account_digest", unique=True),
        # ReportAccountUse looks an account up across every partner's list.
        Index("ix_eligible_accounts_account_digest", "account_digest"),
    )

    entry_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    partner_id: Mapped[str] = mapped_column(ForeignKey("partners.partner_id", ondelete="CASCADE"))
    account_kind: Mapped[str] = mapped_column(String(16))
    account_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    key_id: Mapped[str] = mapped_column(String(16))
    partner_reference: Mapped[str] = mapped_column(String(128), default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


ACTIVE = "active"
REVOKED = "revoked"


class Binding(Base):
    """An account of one partner bound to one device."""

    __tablename__ = "bindings"
    __table_args__ = (
        # At most one active binding per account per partner, enforced by the
        # database however many devices report the account at once.
        Index(
            "uq_bindings_active_account",
            "partner_id",
            "account_digest",
            unique=True,
            postgresql_where=text("state = 'active'"),
            sqlite_where=text("state = 'active'"),
        ),
        Index("ix_bindings_device_digest", "device_digest"),
        Index("ix_bindings_partner_create_time", "partner_id", "create_time"),
    )

    binding_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    partner_id: Mapped[str] = mapped_column(ForeignKey("partners.partner_id", ondelete="CASCADE"))
    account_kind: Mapped[str] = mapped_column(String(16))
    account_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    device_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    key_id: Mapped[str] = mapped_column(String(16))
    # The partner's reference from its list, else the list entry's id: what
    # instructions to the partner carry instead of the raw account.
    partner_reference: Mapped[str] = mapped_column(String(128), default="")
    state: Mapped[str] = mapped_column(String(16), default=ACTIVE)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoke_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Why it was revoked: "unbound" or "moved".
    revoke_reason: Mapped[str | None] = mapped_column(String(16))
