"""Alembic environment: runs migrations over the async engine."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

# The whole schema: every module that defines tables. The one place below
# app.py that names the areas (tests/test_layers.py allows it): Alembic
# compares one metadata with one database.
from tether.server.binding import tables as _binding  # noqa: F401
from tether.server.guard import tables as _guard  # noqa: F401
from tether.server.provisioning import tables as _provisioning  # noqa: F401
from tether.server.shared import partners as _partners  # noqa: F401
from tether.server.storage import idempotency as _idempotency  # noqa: F401
from tether.server.storage.base import Base, UtcDateTime
from tether.server.storage.database import create_engine
from tether.server.storage.schema import compared
from tether.server.transport import credentials as _credentials  # noqa: F401

metadata = Base.metadata


def _render_item(kind: str, obj: Any, _context: AutogenContext) -> str | Literal[False]:
    # Migrations spell the column type as the database sees it.
    if kind == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=compared(connection.dialect.name),
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


asyncio.run(_run_async())
