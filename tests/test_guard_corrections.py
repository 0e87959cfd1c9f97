"""Operators' corrections through gRPC and the CLI: splitting a wrongly
linked fingerprint, merging two identities of one browser; both recorded,
kept by RebuildCounters and by a restart."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path
from typing import NamedTuple

import grpc
import redis.asyncio as redis
from sqlalchemy import select

from tests.guard_support import fingerprint, guard_client, guard_of, new_service
from tests.support import RunningServer, expect_error, start_server
from tether.clients.guard.client import GuardClient, account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.counters.connection import KEY_PREFIX
from tether.server.guard import identity_record
from tether.server.guard.tables import GuardLinkRecord

CLI = str(Path(sys.executable).parent / "tether-internal")


def home() -> str:
    return f"10.210.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


class Registered(NamedTuple):
    verdict: pb.EvaluateResponse
    components: pb.FingerprintComponents

    @property
    def fingerprint(self) -> str:
        return self.verdict.explanation.fingerprint


async def _drifted_pair(
    guard: GuardClient, service: str, network: str
) -> tuple[Registered, Registered]:
    """Two registrations: a browser, and a window size later the same one."""
    seed = secrets.token_hex(4)
    base, resized = fingerprint(seed), fingerprint(seed, screen_width=1440)
    first = await guard.evaluate(service, "register", account("u1"), base, network)
    second = await guard.evaluate(service, "register", account("u2"), resized, network)
    assert second.identity == first.identity, (first, second)
    return Registered(first, base), Registered(second, resized)


async def _flush_counters(server: RunningServer, redis_url: str, service: str) -> None:
    """Redis forgets the service's counters (a restart without persistence)."""
    client = redis.Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=f"{KEY_PREFIX}:g:{service}:*"):
            await client.delete(key)
    finally:
        await client.aclose()


async def test_unlinking_splits_a_fingerprint_and_its_counts_and_survives_a_rebuild(
    any_server: RunningServer, redis_url: str
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=2)
    network = home()
    first, second = await _drifted_pair(guard, service, network)
    identity = first.verdict.identity
    # The identity is full: a third account through either is refused.
    full = await guard.evaluate(service, "register", account("u3"), first.components, network)
    assert full.verdict == pb.VERDICT_DENY
    explained = await guard.explain_identity(identity)
    assert [f.fingerprint for f in explained.fingerprints] == [identity, second.fingerprint]
    assert explained.fingerprints[1].link.kind == pb.LINK_KIND_DRIFT_SAME_NETWORK

    split = await guard.unlink(second.fingerprint, reason="two family computers")
    assert (split.identity, split.previous_identity) == (second.fingerprint, identity)
    # Each side keeps the account counted through it, and has room again.
    again = await guard.evaluate(service, "register", account("u2"), second.components, network)
    assert (again.identity, again.reason, again.count) == (
        second.fingerprint,
        pb.VERDICT_REASON_ALREADY_COUNTED,
        1,
    )
    room = await guard.evaluate(service, "register", account("u3"), first.components, network)
    assert (room.identity, room.verdict) == (identity, pb.VERDICT_ALLOW)

    await _flush_counters(any_server, redis_url, service)
    assert await guard.rebuild(service) == 3
    after = await guard.evaluate(service, "register", account("u2"), second.components, network)
    assert (after.identity, after.reason, after.count) == (
        second.fingerprint,
        pb.VERDICT_REASON_ALREADY_COUNTED,
        1,
    )
    # Later drift of the split fingerprint does not join it back.
    assert (await guard.unlink(split.identity)).identity == split.identity


async def test_a_link_followed_after_the_split_does_not_join_them_again(
    any_server: RunningServer,
) -> None:
    """The book follower may read a link record, then apply it after an
    operator split its fingerprint here (the split's own record not read
    yet): the two stay apart. (Seen once in CI: the split browser counted
    with the identity it had left until the next read.)"""
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=2)
    network = home()
    first, second = await _drifted_pair(guard, service, network)
    live = guard_of(any_server)
    await live.recorder.flush()
    async with live.db.sessions() as session:
        link = await session.scalar(
            select(GuardLinkRecord).where(GuardLinkRecord.source == second.fingerprint)
        )
    assert link is not None
    await guard.unlink(second.fingerprint, reason="two family computers")
    assert identity_record._apply_followed(live.book, link) == 1
    again = await guard.evaluate(service, "register", account("u2"), second.components, network)
    assert (again.identity, again.reason, again.count) == (
        second.fingerprint,
        pb.VERDICT_REASON_ALREADY_COUNTED,
        1,
    )
    assert live.book.find(first.fingerprint) != live.book.find(second.fingerprint)


async def test_merging_joins_two_identities_and_survives_a_rebuild(
    any_server: RunningServer, redis_url: str
) -> None:
    guard = await guard_client(any_server)
    service = await new_service(guard, register_limit=3)
    laptop = fingerprint(secrets.token_hex(4))
    tablet = fingerprint(secrets.token_hex(4), os_name="Android", platform="Linux armv8l")
    a = await guard.evaluate(service, "register", account("a1"), laptop, home())
    b = await guard.evaluate(service, "register", account("b1"), tablet, home())
    await guard.evaluate(service, "register", account("b2"), tablet, home())
    assert a.identity != b.identity

    merged = await guard.merge(a.identity, b.identity, reason="one person's two devices")
    assert merged == a.identity
    # Three accounts now count for the one identity: the limit is reached.
    refused = await guard.evaluate(service, "register", account("a4"), laptop, home())
    assert refused.verdict == pb.VERDICT_DENY
    assert refused.identity == a.identity
    explained = await guard.explain_identity(b.identity)
    assert explained.identity == a.identity
    assert [m.kind for m in explained.merges] == [pb.LINK_KIND_OPERATOR_MERGE]

    await _flush_counters(any_server, redis_url, service)
    assert await guard.rebuild(service) == 3
    still = await guard.evaluate(service, "register", account("b9"), tablet, home())
    assert (still.identity, still.verdict) == (a.identity, pb.VERDICT_DENY)
    # Merging again, either way round, changes nothing.
    assert await guard.merge(b.identity, a.identity) == a.identity


async def test_corrections_are_replayed_after_a_restart(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    server = await start_server(database_url=postgres_url, redis_url=redis_url, data_dir=tmp_path)
    try:
        guard = await guard_client(server)
        service = await new_service(guard, register_limit=2)
        first, second = await _drifted_pair(guard, service, home())
        await guard.unlink(second.fingerprint)
        await guard_of(server).recorder.flush()
    finally:
        await server.stop()
    server = await start_server(database_url=postgres_url, redis_url=redis_url, data_dir=tmp_path)
    try:
        guard = await guard_client(server)
        explained = await guard.explain_identity(second.fingerprint)
        assert explained.identity == second.fingerprint
        assert [f.fingerprint for f in explained.fingerprints] == [explained.identity]
        first_identity = first.verdict.identity
        assert (await guard.explain_identity(first_identity)).identity == first_identity
    finally:
        await server.stop()


async def test_corrections_need_known_identities_and_an_operator(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    unknown = secrets.token_hex(16)
    for call in (
        guard.explain_identity(unknown),
        guard.unlink(unknown),
        guard.merge(unknown, unknown),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "ERROR_REASON_GUARD_IDENTITY_NOT_FOUND")
    detail = await expect_error(
        guard.unlink("not-hex", reason="x" * 600), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(detail.violations) == {"fingerprint", "reason"}
    device = GuardClient(any_server.channel(await any_server.credential("device")))
    await expect_error(device.unlink(unknown), grpc.StatusCode.PERMISSION_DENIED)


async def _cli(server: RunningServer, token: str, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        CLI, "--address", server.address, "--token", token, "guard", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_cli_explains_unlinks_and_merges(pg_server: RunningServer) -> None:
    token = await pg_server.credential("internal")
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=5)
    first, second = await _drifted_pair(guard, service, home())
    identity = first.verdict.identity
    code, out = await _cli(pg_server, token, "explain", identity)
    assert code == 0, out
    explained = json.loads(out)
    assert [f["fingerprint"] for f in explained["fingerprints"]] == [identity, second.fingerprint]
    assert explained["fingerprints"][1]["link"]["kind"] == "LINK_KIND_DRIFT_SAME_NETWORK"
    code, out = await _cli(pg_server, token, "unlink", second.fingerprint, "--reason", "not one")
    assert code == 0, out
    assert json.loads(out)["identity"] == second.fingerprint
    code, out = await _cli(pg_server, token, "merge", identity, second.fingerprint)
    assert (code, json.loads(out)) == (0, {"identity": identity})
