"""What other areas may know of a binding, and the hooks through which
they learn of it. The binding area implements them; app.py hands them to
whoever listens (provisioning), so neither area imports the other.

The change hook runs inside the transaction that made the change:
provisioning writes its outbox row in that same transaction, so a binding
can never exist without its service instruction, nor the reverse.

A listener may also offer its writes for new bindings as SQL (see
SqlBindingListener): on PostgreSQL a report then inserts its bindings and
every listener's rows with one statement, a single round trip, instead of
one per row.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from sqlalchemy import CTE, ColumnElement
from sqlalchemy.ext.asyncio import AsyncSession


class BindingFacts(Protocol):
    """A binding as other areas see it (the binding area's row satisfies it)."""

    @property
    def binding_id(self) -> uuid.UUID: ...
    @property
    def partner_id(self) -> str: ...
    @property
    def account_kind(self) -> str: ...
    @property
    def account_digest(self) -> bytes: ...
    @property
    def device_digest(self) -> bytes: ...
    # The partner's reference from its list, else the list entry's id: what
    # instructions to the partner carry instead of the raw account.
    @property
    def partner_reference(self) -> str: ...


# Reads one binding in the caller's session; None if there is none.
BindingReader = Callable[[AsyncSession, uuid.UUID], Awaitable[BindingFacts | None]]


@dataclass(frozen=True)
class BindingChange:
    # "created": a new active binding; "revoked": an active binding ended.
    change: Literal["created", "revoked"]
    binding: BindingFacts
    # For "revoked": "unbound" or "moved".
    reason: str = ""


# Called with the open session; an exception rolls the whole change back.
BindingListener = Callable[[AsyncSession, BindingChange], Awaitable[None]]


@dataclass(frozen=True)
class CreatedWrites:
    """A listener's writes for new bindings, as parts of the binding's INSERT."""

    # Data-modifying CTEs; they run once for every row of the `created` CTE.
    ctes: Sequence[CTE]
    # Evaluated per created binding in the statement's answer; handed back
    # to `created_done` (e.g. how many rows were written for it).
    marker: ColumnElement[Any]


@runtime_checkable
class SqlBindingListener(Protocol):
    """A binding listener that can also write for new bindings in SQL.

    `created_writes` gets the `created` CTE (every column of the bindings
    table, one row per binding just inserted); the bind parameter "now"
    is the report's time and "trace_parent" its W3C traceparent ("" when
    not traced). Its CTEs must do exactly what the listener does
    when called with a "created" change; `created_done` then runs in the
    same transaction for the work that is not SQL (wake-ups).
    """

    async def __call__(self, session: AsyncSession, change: BindingChange) -> None: ...

    def created_writes(self, created: CTE) -> CreatedWrites: ...

    async def created_done(
        self, session: AsyncSession, binding: BindingFacts, marker: Any
    ) -> None: ...

    # What created_done does after commit, for a report that ran on a bare
    # connection (no session) and has just committed.
    def created_committed(self, binding: BindingFacts, marker: Any) -> None: ...
