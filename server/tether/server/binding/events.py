"""What the binding area tells others, inside the transaction that made it.

Provisioning listens to write its outbox row in that same transaction: a
binding can never exist without its service instruction, nor the reverse.

A listener may also offer its writes for new bindings as SQL (see
SqlBindingListener): on PostgreSQL a report then inserts its bindings and
every listener's rows with one statement, a single round trip, instead of
one per row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from sqlalchemy import CTE, ColumnElement
from sqlalchemy.ext.asyncio import AsyncSession

from tether.server.binding.tables import Binding


@dataclass(frozen=True)
class BindingChange:
    # "created": a new active binding; "revoked": an active binding ended.
    change: Literal["created", "revoked"]
    binding: Binding
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
    table, one row per binding just inserted) and the bind parameter "now"
    is the report's time. Its CTEs must do exactly what the listener does
    when called with a "created" change; `created_done` then runs in the
    same transaction for the work that is not SQL (wake-ups).
    """

    async def __call__(self, session: AsyncSession, change: BindingChange) -> None: ...

    def created_writes(self, created: CTE) -> CreatedWrites: ...

    async def created_done(self, session: AsyncSession, binding: Binding, marker: Any) -> None: ...

    # What created_done does after commit, for a report that ran on a bare
    # connection (no session) and has just committed.
    def created_committed(self, binding: Binding, marker: Any) -> None: ...
