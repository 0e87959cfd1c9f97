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

import asyncpg
from google.protobuf.message import Message
from sqlalchemy import LargeBinary, String, bindparam
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import AlreadyExists, TetherError, Violations
from tether.server.storage import dialects
from tether.server.storage.base import Base, UtcDateTime, utcnow
from tether.server.storage.compiled import CompiledStatement, DriverConnection
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
    connection: AsyncConnection | DriverConnection,
    dialect: Dialect,
    principal: Principal,
    *,
    method: str,
    request_id: str,
    digest: bytes,
    response: Message,
) -> None:
    stored = await _store_statement(dialect).rows(
        connection,
        credential_id=principal.credential_id,
        method=method,
        request_id=request_id,
        request_hash=digest,
        response=response.SerializeToString(),
        create_time=utcnow(),
    )
    if not stored:
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
            connection = await session.connection()
            await _store(
                connection,
                connection.dialect,
                principal,
                method=method,
                request_id=request_id,
                digest=digest,
                response=response,
            )
            return response
    except (_AnsweredBefore, IntegrityError, TetherError) as exc:
        return await _earlier_answer(
            exc,
            db,
            principal,
            method=method,
            request_id=request_id,
            digest=digest,
            response_type=response_type,
        )


class Fallback(Exception):
    """Raised by the work of run_once_direct: run the call on the general path."""


# What direct work returns: the answer, and what to do once it has committed.
DirectWork = Callable[[DriverConnection], Awaitable[tuple[Response, Callable[[], None]]]]


async def run_once_direct(
    db: Database,
    principal: Principal,
    *,
    method: str,
    request: Message,
    response_type: type[Response],
    work: DirectWork[Response],
    general: Callable[[], Awaitable[Response]],
) -> Response:
    """run_once for a hot call's fast path, on a bare asyncpg connection
    (PostgreSQL only; see Database.driver_transaction).

    No ORM session nor SQLAlchemy connection: their set-up, flush checks,
    events and greenlet hops cost more CPU than a one-statement call's own
    work. work(connection) raises Fallback when
    it cannot finish without a session; its transaction then rolls back and
    general() (which should use run_once) runs the call instead. The
    guarantees are run_once's: the answer is stored in the transaction of
    the change, and a repeat gets the first answer back.
    """
    request_id: str = request.request_id  # type: ignore[attr-defined]
    digest = _body_hash(request)
    try:
        async with db.driver_transaction() as connection:
            response, committed = await work(connection)
            await _store(
                connection,
                db.engine.dialect,
                principal,
                method=method,
                request_id=request_id,
                digest=digest,
                response=response,
            )
    except Fallback:
        return await general()
    except (_AnsweredBefore, asyncpg.IntegrityConstraintViolationError, TetherError) as exc:
        return await _earlier_answer(
            exc,
            db,
            principal,
            method=method,
            request_id=request_id,
            digest=digest,
            response_type=response_type,
        )
    committed()
    return response


async def _earlier_answer(
    exc: Exception,
    db: Database,
    principal: Principal,
    *,
    method: str,
    request_id: str,
    digest: bytes,
    response_type: type[Response],
) -> Response:
    """The stored answer of a repeated request; else exc raised again."""
    async with db.sessions() as session:
        key = (principal.credential_id, method, request_id)
        earlier = await session.get(IdempotencyRecord, key)
    if earlier is None:
        if isinstance(exc, _AnsweredBefore):
            raise AssertionError("stored answer vanished") from exc
        raise exc
    return _replay(earlier, digest, response_type)


def _replay(record: IdempotencyRecord, digest: bytes, response_type: type[Response]) -> Response:
    if record.request_hash != digest:
        raise AlreadyExists(
            ErrorReason.ERROR_REASON_REQUEST_ID_REUSED,
            f"request_id {record.request_id!r} was used for a different request",
            metadata={"request_id": record.request_id},
        )
    return response_type.FromString(record.response)
