"""How an area plugs into the server: its gRPC services and background work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Component:
    # Fully qualified gRPC service names, for health checking and reflection.
    services: list[str]
    # Started after the server listens; stopped before the database closes.
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    extra: dict[str, object] = field(default_factory=dict)
