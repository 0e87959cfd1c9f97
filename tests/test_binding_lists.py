"""Eligible lists: add, remove, list, and the streaming import."""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from tests import binding_support as bs
from tests.support import RunningServer, expect_error, start_server
from tether.binding.v1 import messages_pb2 as pb
from tether.clients.paging import every
from tether.common.v1 import types_pb2 as types
from tether.server.binding import store_postgres

APPEND = pb.IMPORT_MODE_APPEND
REPLACE = pb.IMPORT_MODE_REPLACE


def entries(
    accounts: Sequence[types.Account], reference: str = ""
) -> list[pb.EligibleAccountEntry]:
    return [pb.EligibleAccountEntry(account=a, partner_reference=reference) for a in accounts]


def header(mode: pb.ImportMode.ValueType, **fields: object) -> pb.ImportEligibleAccountsRequest:
    return pb.ImportEligibleAccountsRequest(header=pb.ImportHeader(mode=mode, **fields))  # type: ignore[arg-type]


def batch(items: Sequence[pb.EligibleAccountEntry]) -> pb.ImportEligibleAccountsRequest:
    return pb.ImportEligibleAccountsRequest(batch=pb.ImportBatch(entries=items))


async def stream(
    *messages: pb.ImportEligibleAccountsRequest,
) -> AsyncIterator[pb.ImportEligibleAccountsRequest]:
    for message in messages:
        yield message


def entries_paged(
    server: RunningServer, token: str, page_size: int
) -> AsyncIterator[pb.EligibleAccount]:
    return every(
        lambda page_token: bs.stub(server, token).ListEligibleAccounts(
            pb.ListEligibleAccountsRequest(page_size=page_size, page_token=page_token)
        ),
        lambda page: page.entries,
    )


async def all_entries(server: RunningServer, token: str) -> list[pb.EligibleAccount]:
    return [entry async for entry in entries_paged(server, token, 1000)]


async def test_added_accounts_are_listed_and_updated_on_second_add(
    any_server: RunningServer,
) -> None:
    _, token = await any_server.partner()
    accounts = [
        bs.phone_account(),
        bs.member(),
        types.Account(kind=types.ACCOUNT_KIND_EMAIL, value="Someone@Example.COM"),
    ]
    first = await bs.add_accounts(any_server, token, accounts, reference="ref-1")
    assert (first.added_count, first.updated_count) == (3, 0)
    second = await bs.add_accounts(any_server, token, accounts[:2], reference="ref-2")
    assert (second.added_count, second.updated_count) == (0, 2)
    listed = await all_entries(any_server, token)
    assert sorted(e.partner_reference for e in listed) == ["ref-1", "ref-2", "ref-2"]
    assert {e.account_kind for e in listed} == {
        types.ACCOUNT_KIND_PHONE_NUMBER,
        types.ACCOUNT_KIND_MEMBER_ID,
        types.ACCOUNT_KIND_EMAIL,
    }


async def test_removed_accounts_leave_the_list(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    accounts = [bs.member() for _ in range(3)]
    await bs.add_accounts(any_server, token, accounts)
    removed = await bs.stub(any_server, token).RemoveEligibleAccounts(
        pb.RemoveEligibleAccountsRequest(accounts=[accounts[0], bs.member()])
    )
    assert removed.removed_count == 1
    assert await bs.count_entries(any_server, partner_id) == 2


async def test_eligible_list_pages_cover_every_entry_once(any_server: RunningServer) -> None:
    _, token = await any_server.partner()
    await bs.add_accounts(any_server, token, [bs.member() for _ in range(25)])
    seen = [e.entry_id async for e in entries_paged(any_server, token, 10)]
    assert len(seen) == len(set(seen)) == 25
    assert [int(s) for s in seen] == sorted(int(s) for s in seen)


async def test_bad_entries_reject_the_whole_add(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    request = pb.AddEligibleAccountsRequest(
        entries=[
            *entries([bs.member()]),
            pb.EligibleAccountEntry(
                account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value="+1")
            ),
            pb.EligibleAccountEntry(account=bs.member(), partner_reference="r" * 129),
            pb.EligibleAccountEntry(account=types.Account(kind=types.ACCOUNT_KIND_LOGIN_ID)),
        ]
    )
    detail = await expect_error(
        bs.stub(any_server, token).AddEligibleAccounts(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {
        "entries[1].account.value",
        "entries[2].partner_reference",
        "entries[3].account.value",
    }
    assert await bs.count_entries(any_server, partner_id) == 0
    for bad in (
        pb.AddEligibleAccountsRequest(),
        pb.AddEligibleAccountsRequest(entries=entries([bs.member() for _ in range(1001)])),
    ):
        detail = await expect_error(
            bs.stub(any_server, token).AddEligibleAccounts(bad),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
        )
        assert set(detail.violations) == {"entries"}
    assert await bs.count_entries(any_server, partner_id) == 0


async def test_another_partners_list_is_not_found(any_server: RunningServer) -> None:
    other_id, _ = await any_server.partner()
    _, token = await any_server.partner()
    partners = bs.stub(any_server, token)
    for call in (
        partners.AddEligibleAccounts(
            pb.AddEligibleAccountsRequest(partner_id=other_id, entries=entries([bs.member()]))
        ),
        partners.RemoveEligibleAccounts(
            pb.RemoveEligibleAccountsRequest(partner_id=other_id, accounts=[bs.member()])
        ),
        partners.ListEligibleAccounts(pb.ListEligibleAccountsRequest(partner_id=other_id)),
        partners.ImportEligibleAccounts(
            stream(header(APPEND, partner_id=other_id), batch(entries([bs.member()])))
        ),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "ERROR_REASON_PARTNER_NOT_FOUND")
    assert await bs.count_entries(any_server, other_id) == 0


async def test_admin_must_name_an_existing_partner(any_server: RunningServer) -> None:
    partner_id, _ = await any_server.partner()
    admin = bs.stub(any_server, any_server.admin_token)
    detail = await expect_error(
        admin.AddEligibleAccounts(pb.AddEligibleAccountsRequest(entries=entries([bs.member()]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"partner_id"}
    await expect_error(
        admin.AddEligibleAccounts(
            pb.AddEligibleAccountsRequest(
                partner_id="no-such-partner", entries=entries([bs.member()])
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_PARTNER_NOT_FOUND",
    )
    added = await admin.AddEligibleAccounts(
        pb.AddEligibleAccountsRequest(partner_id=partner_id, entries=entries([bs.member()]))
    )
    assert added.added_count == 1


async def test_device_credentials_cannot_touch_lists(any_server: RunningServer) -> None:
    partner_id, _ = await any_server.partner()
    device = bs.stub(any_server, await any_server.credential("device"))
    await expect_error(
        device.AddEligibleAccounts(
            pb.AddEligibleAccountsRequest(partner_id=partner_id, entries=entries([bs.member()]))
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ERROR_REASON_CALLER_NOT_ALLOWED",
    )
    assert await bs.count_entries(any_server, partner_id) == 0


async def test_import_appends_and_reports_rejected_entries(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    kept = bs.member()
    await bs.add_accounts(any_server, token, [kept])
    good = [bs.phone_account() for _ in range(30)]
    bad = pb.EligibleAccountEntry(
        account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value="12")
    )
    response = await bs.stub(any_server, token).ImportEligibleAccounts(
        stream(
            header(APPEND),
            batch(entries(good[:20])),
            batch([*entries(good[20:]), bad, *entries(good[:1], "dup")]),
        )
    )
    assert response.received_count == 32
    assert response.imported_count == 30
    assert response.rejected_count == 1
    assert [(r.index, r.field) for r in response.rejected] == [(30, "account.value")]
    assert response.removed_count == 0
    assert await bs.count_entries(any_server, partner_id) == 31
    listed = await all_entries(any_server, token)
    assert sum(e.partner_reference == "dup" for e in listed) == 1  # the last entry wins


async def test_import_of_new_accounts_counts_every_batch(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    await bs.add_accounts(any_server, token, [bs.member()])
    response = await bs.stub(any_server, token).ImportEligibleAccounts(
        stream(header(APPEND), *(batch(entries([bs.member() for _ in range(7)])) for _ in range(3)))
    )
    assert (response.received_count, response.imported_count) == (21, 21)
    assert await bs.count_entries(any_server, partner_id) == 22


async def test_import_keeps_the_last_entry_of_an_account_named_twice_in_a_batch(
    any_server: RunningServer,
) -> None:
    partner_id, token = await any_server.partner()
    twice = bs.member()
    others = [bs.member() for _ in range(5)]
    response = await bs.stub(any_server, token).ImportEligibleAccounts(
        stream(
            header(APPEND),
            batch([*entries([twice], "first"), *entries(others), *entries([twice], "last")]),
            batch(entries([bs.member() for _ in range(3)])),
        )
    )
    assert (response.received_count, response.imported_count) == (10, 9)
    assert await bs.count_entries(any_server, partner_id) == 9
    listed = await all_entries(any_server, token)
    assert [e.partner_reference for e in listed].count("last") == 1
    assert "first" not in {e.partner_reference for e in listed}


async def test_import_replace_makes_the_list_exactly_the_stream(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    old = [bs.member() for _ in range(10)]
    await bs.add_accounts(any_server, token, old, reference="old")
    new = [bs.member() for _ in range(5)]
    response = await bs.stub(any_server, token).ImportEligibleAccounts(
        stream(header(REPLACE), batch(entries([*old[:3], *new], "new")))
    )
    assert (response.imported_count, response.removed_count) == (8, 7)
    listed = await all_entries(any_server, token)
    assert len(listed) == 8
    assert {e.partner_reference for e in listed} == {"new"}
    assert await bs.count_entries(any_server, partner_id) == 8


async def test_failed_import_changes_nothing(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    await bs.add_accounts(any_server, token, [bs.member() for _ in range(5)])
    before = await all_entries(any_server, token)
    partners = bs.stub(any_server, token)
    bad = pb.EligibleAccountEntry(account=types.Account(kind=types.ACCOUNT_KIND_MEMBER_ID))
    # Too many rejections, found in the last batch.
    detail = await expect_error(
        partners.ImportEligibleAccounts(
            stream(
                header(REPLACE, max_rejected=1),
                batch(entries([bs.member() for _ in range(50)])),
                batch([bad, bad]),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"entries[50].account.value", "entries[51].account.value"}
    # A second header mid-stream.
    await expect_error(
        partners.ImportEligibleAccounts(
            stream(header(REPLACE), batch(entries([bs.member()])), header(REPLACE))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    # An oversized batch.
    await expect_error(
        partners.ImportEligibleAccounts(
            stream(header(APPEND), batch(entries([bs.member()] * 10_001)))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert await all_entries(any_server, token) == before
    assert await bs.count_entries(any_server, partner_id) == 5


@pytest.fixture(params=["postgres", "sqlite"])
async def cached_server(
    request: pytest.FixtureRequest, postgres_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    """A server that trusts a verified credential for a minute.

    The cancellation test must cancel the import itself, not the credential
    lookup in front of it (cancelling that is a separate matter).
    """
    database_url = (
        postgres_url
        if request.param == "postgres"
        else f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}"
    )
    server = await start_server(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        credential_cache_seconds=60.0,
    )
    yield server
    await server.stop()


async def test_cancelled_import_changes_nothing(cached_server: RunningServer) -> None:
    any_server = cached_server
    partner_id, token = await any_server.partner()
    await bs.add_accounts(any_server, token, [bs.member() for _ in range(5)])
    before = await all_entries(any_server, token)
    sent = asyncio.Event()

    async def then_hang() -> AsyncIterator[pb.ImportEligibleAccountsRequest]:
        yield header(REPLACE)
        for _ in range(3):
            yield batch(entries([bs.member() for _ in range(100)]))
        sent.set()
        await asyncio.Event().wait()  # the caller gives up before the end

    call = bs.stub(any_server, token).ImportEligibleAccounts(then_hang())
    await sent.wait()
    # Cancel mid-import, not while the call is still being authenticated:
    # the server sends its initial metadata once it has taken the header.
    await call.initial_metadata()
    await bs.wait_for_import_transaction(any_server)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # A later import of the same list works: nothing was left locked.
    response = await bs.stub(any_server, token).ImportEligibleAccounts(
        stream(header(APPEND), batch(entries([bs.member()])))
    )
    assert response.imported_count == 1
    after = await all_entries(any_server, token)
    assert after[:5] == before
    assert len(after) == 6
    assert await bs.count_entries(any_server, partner_id) == 6


async def test_import_must_start_with_a_header(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    await expect_error(
        bs.stub(any_server, token).ImportEligibleAccounts(stream(batch(entries([bs.member()])))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_IMPORT_HEADER_MISSING",
    )
    detail = await expect_error(
        bs.stub(any_server, token).ImportEligibleAccounts(
            stream(header(pb.IMPORT_MODE_UNSPECIFIED), batch(entries([bs.member()])))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"header.mode"}
    assert await bs.count_entries(any_server, partner_id) == 0


async def test_imported_accounts_bind(any_server: RunningServer) -> None:
    partner_id, token = await any_server.partner()
    account = bs.phone_account()
    await bs.stub(any_server, token).ImportEligibleAccounts(
        stream(header(APPEND), batch(entries([account], "crm-7")))
    )
    device_token = await any_server.credential("device")
    response = await bs.stub(any_server, device_token).ReportAccountUse(
        bs.report_request(bs.device(), account)
    )
    assert [(o.partner_id, o.binding.partner_reference) for o in response.outcomes] == [
        (partner_id, "crm-7")
    ]


async def _list_statistics(server: RunningServer) -> tuple[int, float]:
    """How often the eligible list was analyzed by hand, and its row estimate."""
    async with server.app.runtime.db.sessions() as session:
        row = (
            await session.execute(
                text(
                    "SELECT s.analyze_count, c.reltuples FROM pg_stat_user_tables s "
                    "JOIN pg_class c ON c.oid = s.relid WHERE s.relname = 'eligible_accounts'"
                )
            )
        ).one()
    return int(row[0]), float(row[1])


async def test_a_large_import_refreshes_the_lists_statistics(pg_server: RunningServer) -> None:
    _, token = await pg_server.partner()
    partners = bs.stub(pg_server, token)
    analyzed, _ = await _list_statistics(pg_server)
    await partners.ImportEligibleAccounts(
        stream(header(APPEND), batch(entries([bs.member() for _ in range(10)])))
    )
    again, estimate = await _list_statistics(pg_server)
    assert again == analyzed  # a small import leaves it to autovacuum

    # Large: at least the minimum, and the share of the list as last estimated.
    size = max(
        store_postgres.STATISTICS_MIN_ROWS,
        math.ceil(store_postgres.STATISTICS_SHARE * estimate) + 1,
    )
    await partners.ImportEligibleAccounts(
        stream(header(APPEND), batch(entries([bs.member() for _ in range(size)])))
    )
    after, new_estimate = await _list_statistics(pg_server)
    assert after == analyzed + 1
    assert new_estimate >= size


async def test_list_entries_need_their_partner_on_both_databases(any_server: RunningServer) -> None:
    # A foreign key on SQLite, triggers on PostgreSQL (migration 0005). The
    # partner is a bare row, so that only its list refers to it.
    partner_id = f"p-{secrets.token_hex(5)}"
    db = any_server.app.runtime.db
    insert = text(
        "INSERT INTO eligible_accounts (partner_id, account_kind, account_digest, key_id, "
        "partner_reference, create_time) VALUES (:partner, 'member_id', :digest, 'k', '', "
        "CURRENT_TIMESTAMP)"
    )
    async with db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO partners (partner_id, display_name, rebind_policy, create_time) "
                "VALUES (:p, 'bare', 'refuse', CURRENT_TIMESTAMP)"
            ),
            {"p": partner_id},
        )
        for n in range(2):
            await session.execute(insert, {"partner": partner_id, "digest": bytes([n]) * 32})

    refused: list[tuple[TextClause, dict[str, object]]] = [
        (insert, {"partner": "p-nobody", "digest": b"\x09" * 32}),
        (
            text("UPDATE eligible_accounts SET partner_id = 'p-nobody' WHERE partner_id = :p"),
            {"p": partner_id},
        ),
        (
            text("UPDATE partners SET partner_id = 'p-renamed' WHERE partner_id = :p"),
            {"p": partner_id},
        ),
    ]
    for statement, values in refused:
        with pytest.raises(IntegrityError):
            async with db.transaction() as session:
                await session.execute(statement, values)
    assert await bs.count_entries(any_server, partner_id) == 2

    async with db.transaction() as session:
        await session.execute(text("DELETE FROM partners WHERE partner_id = :p"), {"p": partner_id})
    assert await bs.count_entries(any_server, partner_id) == 0


async def test_writing_list_entries_keeps_their_partner_from_being_deleted(
    pg_server: RunningServer,
) -> None:
    partner_id, token = await pg_server.partner()
    await bs.add_accounts(pg_server, token, [bs.member()])
    db = pg_server.app.runtime.db
    async with db.transaction() as writing:
        await writing.execute(
            text("UPDATE eligible_accounts SET partner_reference = 'x' WHERE partner_id = :p"),
            {"p": partner_id},
        )
        # The writer holds the partner row (FOR KEY SHARE, as a foreign key
        # would): a delete must wait for it; the lock timeout makes it give up.
        with pytest.raises(DBAPIError, match="lock timeout"):
            async with db.transaction() as deleting:
                await deleting.execute(text("SET LOCAL lock_timeout = '100ms'"))
                await deleting.execute(
                    text("DELETE FROM partners WHERE partner_id = :p"), {"p": partner_id}
                )
    assert await bs.count_entries(pg_server, partner_id) == 1
