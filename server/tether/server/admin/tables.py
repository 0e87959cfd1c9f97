"""SQL tables of partners, preset services and credentials."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.storage.base import Base, UtcDateTime, utcnow


class Partner(Base):
    __tablename__ = "partners"

    partner_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    # "refuse" or "move": see RebindPolicy in the admin contract.
    rebind_policy: Mapped[str] = mapped_column(String(16), default="refuse")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class PresetService(Base):
    __tablename__ = "preset_services"

    partner_id: Mapped[str] = mapped_column(
        ForeignKey("partners.partner_id", ondelete="CASCADE"), primary_key=True
    )
    service_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Credential(Base):
    __tablename__ = "credentials"

    credential_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # device, partner, internal or admin.
    kind: Mapped[str] = mapped_column(String(16))
    partner_id: Mapped[str | None] = mapped_column(
        ForeignKey("partners.partner_id", ondelete="CASCADE"), index=True
    )
    label: Mapped[str] = mapped_column(String(200), default="")
    # SHA-256 of the token's secret part; the token itself is never stored.
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoke_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
