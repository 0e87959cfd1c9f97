"""How an area plugs into the server: its gRPC services and background work.

Each area's `area.py` returns a subclass with typed fields for what app.py
wires onward (hooks) and what tests may reach (background objects).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(kw_only=True)
class Component:
    # Fully qualified gRPC service names, for health checking and reflection.
    services: list[str]
    # Started after the server listens; stopped before the database closes.
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
