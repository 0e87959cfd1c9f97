"""Safe retries of mutating RPCs, keyed by the caller's request_id.

The first answer is stored in the same transaction as the change it
describes, so a retry after a lost response gets that answer again, and a
crash can never leave a change without its record (or the reverse).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import LargeBinary, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import AlreadyExists, Violations
from tether.server.storage.base import Base, UtcDateTime, utcnow
from tether.server.storage.database import Database
from tether.server.transport.principal import Principal

MAX_REQUEST_ID = 64

Response = TypeVar("Response", bound=Message)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"

    credential_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    method: Mapped[str] = mapped_column(String(80), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID), primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    response: Mapped[bytes] = mapped_column(LargeBinary)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


def check_request_id(request_id: str, violations: Violations) -> None:
    if not request_id:
        violations.add("request_id", "required: a caller-chosen id that makes retries safe")
    elif len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        violations.add("request_id", f"at most {MAX_REQUEST_ID} printable characters")


def _body_hash(request: Message) -> bytes:
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("request_id")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).digest()


async def run_once(
    db: Database,
    principal: Principal,
    *,
    method: str,
    request: Message,
    response_type: type[Response],
    work: Callable[[AsyncSession], Awaitable[Response]],
) -> Response:
    """Runs work(session) at most once per (caller, method, request_id).

    request must have a string field `request_id`, already validated.
    """
    request_id: str = request.request_id  # type: ignore[attr-defined]
    digest = _body_hash(request)
    for _attempt in range(2):
        try:
            async with db.transaction() as session:
                key = (principal.credential_id, method, request_id)
                earlier = await session.get(IdempotencyRecord, key)
                if earlier is not None:
                    return _replay(earlier, digest, response_type)
                response = await work(session)
                session.add(
                    IdempotencyRecord(
                        credential_id=principal.credential_id,
                        method=method,
                        request_id=request_id,
                        request_hash=digest,
                        response=response.SerializeToString(),
                    )
                )
                await session.flush()
                return response
        except IntegrityError:
            # A concurrent retry with the same id won the race: replay its answer.
            async with db.sessions() as session:
                found = await session.scalar(
                    select(IdempotencyRecord).where(
                        IdempotencyRecord.credential_id == principal.credential_id,
                        IdempotencyRecord.method == method,
                        IdempotencyRecord.request_id == request_id,
                    )
                )
            if found is not None:
                return _replay(found, digest, response_type)
            raise
    raise AssertionError("unreachable")


def _replay(record: IdempotencyRecord, digest: bytes, response_type: type[Response]) -> Response:
    if record.request_hash != digest:
        raise AlreadyExists(
            ErrorReason.ERROR_REASON_REQUEST_ID_REUSED,
            f"request_id {record.request_id!r} was used for a different request",
            metadata={"request_id": record.request_id},
        )
    return response_type.FromString(record.response)
