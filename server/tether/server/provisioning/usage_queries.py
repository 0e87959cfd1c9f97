"""A device's usage question: the partner's live answer, else the last known.

The question goes to one of the partner's streams, in this process or
another (the store's UsageRelay). A live answer is kept as the device's
last known figures; when the partner is not connected, does not answer in
time or answers with an error, the device gets the last known figures and
why they are not live.
"""

from __future__ import annotations

import enum
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from tether.server.provisioning import entitlements, usage
from tether.server.shared.bindings import BindingReader
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database
from tether.server.transport.principal import Principal

if TYPE_CHECKING:
    from tether.server.provisioning.store import UsageRelay


@dataclass(frozen=True)
class UsageQueryOut:
    """A usage question as it goes to a partner's stream."""

    query_id: str
    binding_id: uuid.UUID
    service_id: str
    partner_reference: str
    deadline: datetime


@dataclass(frozen=True)
class UsageReply:
    """A partner's answer to a usage question."""

    figures: list[tuple[str, int]]
    period: str = ""
    error: str = ""


class Source(enum.Enum):
    """Where the figures come from: the partner live, or the last known
    figures because the partner is not connected or did not answer."""

    PARTNER = "partner"
    NOT_CONNECTED = "not_connected"
    NO_ANSWER = "no_answer"


@dataclass(frozen=True)
class DeviceUsage:
    source: Source
    figures: list[tuple[str, int]]
    period: str
    as_of: datetime | None
    # The partner's error, when it answered with one.
    partner_error: str = ""


class UsageQueries:
    def __init__(self, db: Database, relay: UsageRelay, bindings: BindingReader) -> None:
        self._db = db
        self._relay = relay
        self._bindings = bindings

    async def ask(
        self,
        caller: Principal,
        device: list[bytes],
        binding_id: uuid.UUID,
        service_id: str,
        wait_seconds: float,
    ) -> DeviceUsage:
        """The usage of one service of a binding the caller may see (a
        device naming `device`, or an internal service), waiting for the
        partner at most wait_seconds."""
        async with self._db.sessions() as session:
            binding, _ = await entitlements.of_binding(
                session, self._bindings, binding_id, service_id
            )
            usage.check_scope(binding, caller, device)
        query = UsageQueryOut(
            query_id=secrets.token_hex(12),
            binding_id=binding_id,
            service_id=service_id,
            partner_reference=binding.partner_reference,
            deadline=utcnow() + timedelta(seconds=wait_seconds),
        )
        source = Source.PARTNER
        partner_error = ""
        try:
            reply = await self._relay.ask_usage(binding.partner_id, query, wait_seconds)
        except LookupError:
            source = Source.NOT_CONNECTED
        except TimeoutError:
            source = Source.NO_ANSWER
        else:
            if reply.error:
                source = Source.NO_ANSWER
                partner_error = reply.error
            else:
                async with self._db.transaction() as session:
                    await usage.save_answer(
                        session, binding_id, service_id, reply.figures, reply.period
                    )
                return DeviceUsage(source, reply.figures, reply.period, utcnow())
        async with self._db.sessions() as session:
            known = await usage.last_known(session, binding_id, service_id)
        return DeviceUsage(source, known.figures, known.period, known.as_of, partner_error)
