"""Helpers of the binding tests: devices, accounts, stubs, database checks."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sqlite3
import time
from collections.abc import Sequence

from sqlalchemy import func, select, text
from stdnum import luhn

from tests.support import RunningServer
from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1 import service_pb2_grpc
from tether.common.v1 import types_pb2 as types
from tether.server.binding.tables import ACTIVE, Binding, EligibleAccount
from tether.server.storage import database


def imei() -> str:
    """A random IMEI with a correct check digit."""
    body = "35" + "".join(str(secrets.randbelow(10)) for _ in range(12))
    return body + luhn.calc_check_digit(body)


def device(terminal_id: str | None = None) -> types.Device:
    return types.Device(kind=types.TERMINAL_ID_KIND_IMEI, terminal_id=terminal_id or imei())


# Unique within the test session, not merely random: every test shares the
# session's database, and a number that two tests' partners both listed by
# chance would give a report an outcome from each.
_phone_suffixes = itertools.count(secrets.randbelow(10**7))


def phone() -> str:
    """A valid German mobile number in E.164, new in this test session."""
    return f"+49151{next(_phone_suffixes):08d}"


def phone_account(value: str | None = None) -> types.Account:
    return types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value=value or phone())


def member(value: str | None = None) -> types.Account:
    return types.Account(kind=types.ACCOUNT_KIND_MEMBER_ID, value=value or secrets.token_hex(6))


def stub(server: RunningServer, token: str) -> service_pb2_grpc.BindingAsyncStub:
    return service_pb2_grpc.BindingStub(server.channel(token))


async def add_accounts(
    server: RunningServer,
    partner_token: str,
    accounts: Sequence[types.Account],
    reference: str = "",
) -> pb.AddEligibleAccountsResponse:
    return await stub(server, partner_token).AddEligibleAccounts(
        pb.AddEligibleAccountsRequest(
            entries=[
                pb.EligibleAccountEntry(account=a, partner_reference=reference) for a in accounts
            ]
        )
    )


def report_request(
    dev: types.Device, account: types.Account, partner_ids: Sequence[str] = ()
) -> pb.ReportAccountUseRequest:
    return pb.ReportAccountUseRequest(
        request_id=secrets.token_hex(8), device=dev, account=account, partner_ids=partner_ids
    )


async def count_bindings(
    server: RunningServer, partner_id: str, *, active_only: bool = True
) -> int:
    query = select(func.count()).select_from(Binding).where(Binding.partner_id == partner_id)
    if active_only:
        query = query.where(Binding.state == ACTIVE)
    async with server.app.runtime.db.sessions() as session:
        return int(await session.scalar(query) or 0)


async def count_entries(server: RunningServer, partner_id: str) -> int:
    query = (
        select(func.count())
        .select_from(EligibleAccount)
        .where(EligibleAccount.partner_id == partner_id)
    )
    async with server.app.runtime.db.sessions() as session:
        return int(await session.scalar(query) or 0)


async def wait_for_import_transaction(server: RunningServer, seconds: float = 10.0) -> None:
    """Returns once an import holds its transaction open on the server.

    Nothing can be awaited for this, so it polls, with a bound: PostgreSQL
    shows the import's session in pg_stat_activity; on SQLite the import
    holds the write lock.
    """
    db = server.app.runtime.db
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if database.is_sqlite(db.url):
            path = db.url.split("///", 1)[1]
            probe = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            except sqlite3.OperationalError:
                return
            finally:
                probe.close()
        else:
            async with db.sessions() as session:
                found = await session.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state = 'idle in transaction' AND query ILIKE '%import_%'"
                    )
                )
            if found:
                return
        await asyncio.sleep(0.01)
    raise AssertionError("no import transaction started")
