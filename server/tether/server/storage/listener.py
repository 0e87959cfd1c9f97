"""A kept asyncpg connection that LISTENs on one channel, reconnected when
lost: what the wake-ups and the usage relay each hold beside the pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tether.server import logs
from tether.server.shared.tasks import raise_if_cancelled

log = logs.get(__name__)

# What a kept connection may raise while it is set up or used.
CONNECTION_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def asyncpg_dsn(database_url: str) -> str:
    """The SQLAlchemy URL (postgresql+asyncpg://...) as asyncpg takes it."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def listen_forever(
    dsn: str,
    channel: str,
    on_notify: Callable[[Any, int, str, str], None],
    *,
    connected: Callable[[Any, asyncio.Event], Awaitable[None]],
    disconnected: Callable[[], None],
    what: str,
) -> None:
    """Connects, LISTENs and calls connected(conn, lost); waits until the
    connection is lost (or connected's user sets lost), calls disconnected()
    and starts again. Runs until cancelled."""
    while True:
        raise_if_cancelled()
        lost = asyncio.Event()
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning(f"{what} connection failed; retrying", error=str(exc))
            await asyncio.sleep(1.0)
            continue
        try:
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await conn.add_listener(channel, on_notify)
            await connected(conn, lost)
            await lost.wait()
            log.warning(f"{what} connection lost; reconnecting")
        except CONNECTION_ERRORS as exc:
            log.warning(f"{what} connection failed; reconnecting", error=str(exc))
        finally:
            disconnected()
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
        await asyncio.sleep(0.1)
