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
from sqlalchemy import LargeBinary, String, bindparam
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import AlreadyExists, TetherError, Violations
from tether.server.storage import dialects
from tether.server.storage.base import Base, UtcDateTime, utcnow
from tether.server.storage.compiled import CompiledStatement
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


class _AnsweredBefore(Exception):
    """Raised inside the transaction to roll back a repeated request's work."""


# The answer's INSERT, compiled once per dialect: it runs on every mutating call.
_store_statements: dict[str, CompiledStatement] = {}


def _store_statement(dialect: Dialect) -> CompiledStatement:
    statement = _store_statements.get(dialect.name)
    if statement is None:
        insert = dialects.insert_for(dialect.name, IdempotencyRecord)
        statement = CompiledStatement(
            insert.values(
                {
                    name: bindparam(name)
                    for name in (
                        "credential_id",
                        "method",
                        "request_id",
                        "request_hash",
                        "response",
                        "create_time",
                    )
                }
            )
            .on_conflict_do_nothing()
            .returning(IdempotencyRecord.request_id),
            dialect,
        )
        _store_statements[dialect.name] = statement
    return statement


async def _store(
    session: AsyncSession,
    principal: Principal,
    *,
    method: str,
    request_id: str,
    digest: bytes,
    response: Message,
) -> None:
    connection = await session.connection()
    stored = await _store_statement(connection.dialect).execute(
        connection,
        credential_id=principal.credential_id,
        method=method,
        request_id=request_id,
        request_hash=digest,
        response=response.SerializeToString(),
        create_time=utcnow(),
    )
    if stored.first() is None:
        raise _AnsweredBefore


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

    Optimistic: first requests, the common case, do their work and store the
    answer with no lookup first. A repeated request does its work again,
    finds the answer stored (ON CONFLICT), rolls its work back and returns
    the stored answer; so does one whose second run fails, e.g. an unbind of
    a binding the first run revoked.
    """
    request_id: str = request.request_id  # type: ignore[attr-defined]
    digest = _body_hash(request)
    try:
        async with db.transaction() as session:
            response = await work(session)
            await _store(
                session,
                principal,
                method=method,
                request_id=request_id,
                digest=digest,
                response=response,
            )
            return response
    except (_AnsweredBefore, IntegrityError, TetherError) as exc:
        async with db.sessions() as session:
            earlier = await session.get(
                IdempotencyRecord, (principal.credential_id, method, request_id)
            )
        if earlier is None:
            if isinstance(exc, _AnsweredBefore):
                raise AssertionError("stored answer vanished") from exc
            raise
        return _replay(earlier, digest, response_type)


def _replay(record: IdempotencyRecord, digest: bytes, response_type: type[Response]) -> Response:
    if record.request_hash != digest:
        raise AlreadyExists(
            ErrorReason.ERROR_REASON_REQUEST_ID_REUSED,
            f"request_id {record.request_id!r} was used for a different request",
            metadata={"request_id": record.request_id},
        )
    return response_type.FromString(record.response)
