"""Digests, digest key rotation and import worker processes (each on a server of its own)."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import binding_support as bs
from tests.support import RunningServer, start_server
from tether.binding.v1 import messages_pb2 as pb
from tether.common.v1 import types_pb2 as types
from tether.server.shared import digests


@pytest.mark.parametrize("key_bytes", [32, 63, 64, 65, 200])
def test_digests_are_hmac_sha256_of_kind_and_value(key_bytes: int) -> None:
    """Stored digests stay findable: the digest is exactly HMAC-SHA256 under the key."""
    key = digests.DigestKey("k", secrets.token_bytes(key_bytes))
    for value in ("+4915112345678", "member-1", "", "ünïcode@example.com"):
        expected = hmac.new(key.secret, f"phone_number:{value}".encode(), "sha256").digest()
        assert key.digest("phone_number", value) == expected
        # Twice: the precomputed key states must not carry one message into the next.
        assert key.digest("phone_number", value) == expected


@pytest.fixture
async def rotated(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two servers on one database: one with key "old", one with "new" in front of it."""
    old = digests.new_key_spec("old")
    before = await start_server(
        database_url=postgres_url, redis_url=redis_url, data_dir=tmp_path / "a", digest_keys=old
    )
    after = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path / "b",
        digest_keys=f"{digests.new_key_spec('new')},{old}",
    )
    yield before, after
    await after.stop()
    await before.stop()


async def test_bindings_made_under_an_old_key_are_found_after_rotation(
    rotated: tuple[RunningServer, RunningServer],
) -> None:
    before, after = rotated
    partner_id, partner_token = await before.partner()
    device_token = await before.credential("device")
    account, dev = bs.phone_account(), bs.device()
    await bs.add_accounts(before, partner_token, [account])
    first = await bs.stub(before, device_token).ReportAccountUse(bs.report_request(dev, account))
    assert first.outcomes[0].binding.key_id == "old"

    devices = bs.stub(after, device_token)
    again = await devices.ReportAccountUse(bs.report_request(dev, account))
    assert [o.outcome for o in again.outcomes] == [pb.REPORT_OUTCOME_ALREADY_BOUND]
    assert again.outcomes[0].binding.binding_id == first.outcomes[0].binding.binding_id
    other = await devices.ReportAccountUse(bs.report_request(bs.device(), account))
    assert [o.outcome for o in other.outcomes] == [pb.REPORT_OUTCOME_BOUND_TO_OTHER_DEVICE]
    listed = await devices.ListBindings(pb.ListBindingsRequest(device=dev))
    assert [b.binding_id for b in listed.bindings] == [first.outcomes[0].binding.binding_id]
    assert await bs.count_bindings(after, partner_id) == 1

    removed = await bs.stub(after, partner_token).RemoveEligibleAccounts(
        pb.RemoveEligibleAccountsRequest(accounts=[account])
    )
    assert removed.removed_count == 1


async def test_an_account_listed_again_after_rotation_binds_with_its_current_entry(
    rotated: tuple[RunningServer, RunningServer],
) -> None:
    before, after = rotated
    _, partner_token = await before.partner()
    account = bs.phone_account()
    await bs.add_accounts(before, partner_token, [account], reference="under-old-key")
    # Listed again under the new key: a second entry, with the partner's new reference.
    await bs.add_accounts(after, partner_token, [account], reference="under-new-key")
    device_token = await after.credential("device")
    report = await bs.stub(after, device_token).ReportAccountUse(
        bs.report_request(bs.device(), account)
    )
    (outcome,) = report.outcomes
    assert outcome.outcome == pb.REPORT_OUTCOME_BOUND
    assert (outcome.binding.key_id, outcome.binding.partner_reference) == (
        "new",
        "under-new-key",
    )


@pytest.fixture
async def with_workers(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    server = await start_server(
        database_url=postgres_url, redis_url=redis_url, data_dir=tmp_path, import_workers=1
    )
    yield server
    await server.stop()


async def test_import_in_worker_processes_gives_the_same_list(
    with_workers: RunningServer, pg_server: RunningServer
) -> None:
    numbers = [bs.phone() for _ in range(3000)]
    entries = [
        pb.EligibleAccountEntry(account=bs.phone_account(n), partner_reference=f"r{i}")
        for i, n in enumerate(numbers)
    ]
    entries.insert(
        1234,
        pb.EligibleAccountEntry(
            account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value="+99912")
        ),
    )

    async def requests() -> AsyncIterator[pb.ImportEligibleAccountsRequest]:
        yield pb.ImportEligibleAccountsRequest(header=pb.ImportHeader(mode=pb.IMPORT_MODE_APPEND))
        for start in range(0, len(entries), 1000):
            yield pb.ImportEligibleAccountsRequest(
                batch=pb.ImportBatch(entries=entries[start : start + 1000])
            )

    results = []
    for server in (with_workers, pg_server):
        partner_id, token = await server.partner()
        response = await bs.stub(server, token).ImportEligibleAccounts(requests())
        assert await bs.count_entries(server, partner_id) == len(set(numbers))
        results.append(response)
    assert results[0] == results[1]
    assert [r.index for r in results[0].rejected] == [1234]
