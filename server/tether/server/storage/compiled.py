"""Core statements compiled once, run at the driver level.

A hot statement built and compiled on every call costs more CPU than its
round trip: SQLAlchemy walks the whole construct to find its cache key each
time. Compiled once here, it runs as plain driver SQL with positional
parameters, with the driver's own prepared-statement cache behind it.
Results come back as the driver returns them (no SQLAlchemy type
processing), so callers read plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import CursorResult
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

# An asyncpg connection (asyncpg ships no type hints).
DriverConnection = Any


class CompiledStatement:
    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.positiontup is None:
            raise ValueError(f"{dialect.name}: compiled statements need positional parameters")
        self.sql = compiled.string
        self._names = list(compiled.positiontup)
        # Values fixed in the construct (literals); callers give the rest by name.
        self._fixed = dict(compiled.params)
        self._processors = compiled._bind_processors

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        merged = {**self._fixed, **values}
        args = []
        for name in self._names:
            value = merged[name]
            processor = self._processors.get(name)
            args.append(processor(value) if callable(processor) else value)
        return tuple(args)

    async def execute(self, connection: AsyncConnection, **values: Any) -> CursorResult[Any]:
        return await connection.exec_driver_sql(self.sql, self.parameters(values))

    async def rows(
        self, connection: AsyncConnection | DriverConnection, **values: Any
    ) -> Sequence[Sequence[Any]]:
        """The result's rows, on a SQLAlchemy connection or a bare asyncpg
        one (Database.driver_transaction)."""
        args = self.parameters(values)
        if isinstance(connection, AsyncConnection):
            return (await connection.exec_driver_sql(self.sql, args)).all()
        rows: Sequence[Sequence[Any]] = await connection.fetch(self.sql, *args)
        return rows
