"""Safe retries of mutating RPCs, keyed by the caller's request_id.

The first answer is stored in the same transaction as the change it
describes, so a retry after a lost response gets that answer again, and a
crash can never leave a change without its record (or the reverse).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Generic, TypeVar

import asyncpg
from google.protobuf.message import Message
from sqlalchemy import LargeBinary, String, bindparam
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import AlreadyExists, TetherError
from tether.server.storage import dialects
from tether.server.storage.base import Base, UtcDateTime, utcnow
from tether.server.storage.compiled import CompiledStatement, DriverConnection
from tether.server.storage.database import Database
from tether.server.transport.principal import Principal
from tether.server.transport.request_ids import MAX_REQUEST_ID

Response = TypeVar("Response", bound=Message)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"

    credential_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    method: Mapped[str] = mapped_column(String(80), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(MAX_REQUEST_ID), primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    response: Mapped[bytes] = mapped_column(LargeBinary)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


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


class Fallback(Exception):
    """Raised by the work of Once.run_direct: run the call on the general path
    (a store's fast path raises it when the call needs more than it does)."""


# What direct work returns: the answer, and what to do once it has committed.
DirectWork = Callable[[DriverConnection], Awaitable[tuple[Response, Callable[[], None]]]]


class Once(Generic[Response]):
    """One mutating call made safe to retry: who calls, which method, which
    request (its request_id already validated), and the answer's type.

    Optimistic: first requests, the common case, do their work and store the
    answer with no lookup first. A repeated request does its work again,
    finds the answer stored (ON CONFLICT), rolls its work back and returns
    the stored answer; so does one whose second run fails, e.g. an unbind of
    a binding the first run revoked.
    """

    __slots__ = ("_db", "_digest", "_method", "_principal", "_request_id", "_response_type")

    def __init__(
        self,
        db: Database,
        principal: Principal,
        method: str,
        request: Message,
        response_type: type[Response],
    ) -> None:
        self._db = db
        self._principal = principal
        # Stored with each answer: renaming a method forgets its answers.
        self._method = method
        self._request_id: str = request.request_id  # type: ignore[attr-defined]
        self._digest = _body_hash(request)
        self._response_type = response_type

    async def run(self, work: Callable[[AsyncSession], Awaitable[Response]]) -> Response:
        """Runs work(session) at most once per (caller, method, request_id)."""
        try:
            async with self._db.transaction() as session:
                response = await work(session)
                connection = await session.connection()
                await self._store(connection, connection.dialect, response)
                return response
        except (_AnsweredBefore, IntegrityError, TetherError) as exc:
            return await self._earlier_answer(exc)

    async def run_direct(
        self, work: DirectWork[Response], general: Callable[[], Awaitable[Response]]
    ) -> Response:
        """run for a hot call's fast path, on a bare asyncpg connection
        (PostgreSQL only; see Database.driver_transaction).

        No ORM session nor SQLAlchemy connection: their set-up, flush checks,
        events and greenlet hops cost more CPU than a one-statement call's own
        work. work(connection) raises Fallback when
        it cannot finish without a session; its transaction then rolls back and
        general() (which should use run) runs the call instead. The guarantees
        are run's: the answer is stored in the transaction of the change, and a
        repeat gets the first answer back.
        """
        try:
            async with self._db.driver_transaction() as connection:
                response, committed = await work(connection)
                await self._store(connection, self._db.engine.dialect, response)
        except Fallback:
            return await general()
        except (_AnsweredBefore, asyncpg.IntegrityConstraintViolationError, TetherError) as exc:
            return await self._earlier_answer(exc)
        committed()
        return response

    async def _store(
        self, connection: AsyncConnection | DriverConnection, dialect: Dialect, response: Message
    ) -> None:
        stored = await _store_statement(dialect).rows(
            connection,
            credential_id=self._principal.credential_id,
            method=self._method,
            request_id=self._request_id,
            request_hash=self._digest,
            response=response.SerializeToString(),
            create_time=utcnow(),
        )
        if not stored:
            raise _AnsweredBefore

    async def _earlier_answer(self, exc: Exception) -> Response:
        """The stored answer of a repeated request; else exc raised again."""
        async with self._db.sessions() as session:
            key = (self._principal.credential_id, self._method, self._request_id)
            earlier = await session.get(IdempotencyRecord, key)
        if earlier is None:
            if isinstance(exc, _AnsweredBefore):
                raise AssertionError("stored answer vanished") from exc
            raise exc
        return _replay(earlier, self._digest, self._response_type)


def _replay(record: IdempotencyRecord, digest: bytes, response_type: type[Response]) -> Response:
    if record.request_hash != digest:
        raise AlreadyExists(
            ErrorReason.ERROR_REASON_REQUEST_ID_REUSED,
            f"request_id {record.request_id!r} was used for a different request",
            metadata={"request_id": record.request_id},
        )
    return response_type.FromString(record.response)
