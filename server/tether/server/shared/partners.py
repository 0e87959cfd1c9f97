"""Partners and their preset services: the vocabulary of every area.

Admin creates and edits them; binding checks lists and rebind policies
against them, provisioning opens their preset services.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import NotFound
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


async def get_partner(session: AsyncSession, partner_id: str) -> Partner:
    partner = await session.get(Partner, partner_id) if partner_id else None
    if partner is None:
        raise NotFound(
            ErrorReason.ERROR_REASON_PARTNER_NOT_FOUND, f"partner {partner_id!r} not found"
        )
    return partner
