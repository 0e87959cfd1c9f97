"""What the binding area tells others, inside the transaction that made it.

Provisioning listens to write its outbox row in that same transaction: a
binding can never exist without its service instruction, nor the reverse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

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
