"""Delivery to partners: at least once, effect exactly once; leases,
back-pressure, confirmations of every kind, dead-lettering and replay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from tests import provisioning_support as ps
from tests.support import RunningServer, expect_error, start_server
from tether.clients.partner.provisioning import Done, Failed, PartnerProvisioning
from tether.provisioning.v1 import messages_pb2 as pb
from tether.server.provisioning.leasing import Timing

PENDING = pb.INSTRUCTION_STATE_PENDING
LEASED = pb.INSTRUCTION_STATE_LEASED
CONFIRMED = pb.INSTRUCTION_STATE_CONFIRMED
DEAD = pb.INSTRUCTION_STATE_DEAD
ACCEPTED = pb.CONFIRMATION_OUTCOME_ACCEPTED
DUPLICATE = pb.CONFIRMATION_OUTCOME_DUPLICATE


# Short deadlines and few attempts, so redelivery and dead-lettering show quickly.
FAST_ACK_DEADLINE = 0.3
FAST_RETRY_DELAY = 0.1
FAST = {
    "provisioning_ack_deadline_seconds": FAST_ACK_DEADLINE,
    "provisioning_backoff_factor": 1.0,
    "provisioning_retry_delay_seconds": FAST_RETRY_DELAY,
    "provisioning_max_attempts": 2,
    "provisioning_poll_seconds": 0.2,
}


@pytest.fixture(scope="module")
async def fast_server(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """The PostgreSQL server with FAST delivery settings."""
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("fast-server"),
        **FAST,
    )
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def fast_sqlite_server(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """The SQLite server with FAST delivery settings."""
    data_dir = tmp_path_factory.mktemp("fast-sqlite-server")
    server = await start_server(
        database_url=f"sqlite+aiosqlite:///{data_dir / 'tether.db'}",
        redis_url=redis_url,
        data_dir=data_dir,
        **FAST,
    )
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def backoff_server(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """FAST, but each further lease twice as long as the one before, up to 1 s."""
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("backoff-server"),
        **{
            **FAST,
            "provisioning_backoff_factor": 2.0,
            "provisioning_max_backoff_seconds": 1.0,
            "provisioning_max_attempts": 3,
        },
    )
    yield server
    await server.stop()


@pytest.fixture(params=["postgres", "sqlite"])
def fast_any_server(request: pytest.FixtureRequest) -> RunningServer:
    """A FAST server on each supported database in turn."""
    fixture = "fast_server" if request.param == "postgres" else "fast_sqlite_server"
    server: RunningServer = request.getfixturevalue(fixture)
    return server


class RawStream:
    """A partner stream driven by hand, message by message."""

    def __init__(self, server: RunningServer, token: str, max_in_flight: int = 0) -> None:
        self._out: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        self._out.put_nowait(pb.ConnectRequest(hello=pb.StreamHello(max_in_flight=max_in_flight)))
        self.call = ps.stub(server, token).Connect(self._requests())

    async def _requests(self) -> AsyncIterator[pb.ConnectRequest]:
        while (item := await self._out.get()) is not None:
            yield item

    async def recv(self) -> pb.ConnectResponse:
        response = await asyncio.wait_for(self.call.read(), 20)
        assert isinstance(response, pb.ConnectResponse), response
        return response

    async def instructions(self, count: int) -> list[pb.Instruction]:
        got: list[pb.Instruction] = []
        while len(got) < count:
            response = await self.recv()
            if response.WhichOneof("message") == "instruction":
                got.append(response.instruction)
            elif response.WhichOneof("message") == "instructions":
                got.extend(response.instructions.instructions)
        assert len(got) == count, "more instructions than expected"
        return got

    async def results(self, count: int) -> list[pb.ConfirmationResult]:
        got: list[pb.ConfirmationResult] = []
        while len(got) < count:
            response = await self.recv()
            if response.WhichOneof("message") == "confirmation_result":
                got.append(response.confirmation_result)
            elif response.WhichOneof("message") == "confirmation_results":
                got.extend(response.confirmation_results.results)
        return got

    def confirm(self, instruction_id: str, reference: str = "ref") -> None:
        self._out.put_nowait(
            pb.ConnectRequest(
                confirmation=pb.Confirmation(
                    instruction_id=instruction_id,
                    done=pb.Done(partner_service_reference=reference),
                )
            )
        )

    def cut(self) -> None:
        self.call.cancel()


async def _bind_many(server: RunningServer, partner_token: str, n: int) -> list[ps.Bound]:
    device_token = await server.credential("device")
    return list(
        await asyncio.gather(*(ps.bind(server, device_token, partner_token) for _ in range(n)))
    )


async def test_stream_cut_mid_batch_redelivers_the_rest_and_effects_happen_once(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner()
    await _bind_many(pg_server, partner_token, 20)

    first = RawStream(pg_server, partner_token, max_in_flight=50)
    assert (await first.recv()).WhichOneof("message") == "ready"
    batch = await first.instructions(20)
    for instruction in batch[:10]:
        first.confirm(instruction.instruction_id)
    assert {r.outcome for r in await first.results(10)} == {ACCEPTED}
    first.cut()

    second = RawStream(pg_server, partner_token, max_in_flight=50)
    await second.recv()
    again = await second.instructions(10)
    assert {i.instruction_id for i in again} == {i.instruction_id for i in batch[10:]}
    assert {i.attempt for i in again} == {2}
    # The partner, unsure what went through, confirms the whole batch again.
    for instruction in batch:
        second.confirm(instruction.instruction_id)
    results = {r.instruction_id: r.outcome for r in await second.results(20)}
    assert [results[i.instruction_id] for i in batch] == [DUPLICATE] * 10 + [ACCEPTED] * 10
    second.cut()

    db = pg_server.app.runtime.db
    assert {r.state for r in await ps.instructions_of(db, partner_id)} == {"confirmed"}
    activations = await ps.activations_per_binding(db, partner_id)
    assert len(activations) == 20 and set(activations.values()) == {1}


async def test_slow_partner_gets_no_more_than_its_in_flight_limit(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner()
    await _bind_many(pg_server, partner_token, 5)
    stream = RawStream(pg_server, partner_token, max_in_flight=2)
    ready = (await stream.recv()).ready
    assert ready.max_in_flight == 2
    held = await stream.instructions(2)
    channel = pg_server.channel(await pg_server.credential("internal"))
    assert await ps.pipeline_counts(channel, partner_id) == {LEASED: 2, PENDING: 3}
    stream.confirm(held[0].instruction_id)
    (third,) = await stream.instructions(1)
    assert third.instruction_id not in {i.instruction_id for i in held}
    stream.cut()


async def test_one_lease_for_two_streams_gives_each_its_credit_and_no_more(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner()
    await _bind_many(pg_server, partner_token, 8)
    small = RawStream(pg_server, partner_token, max_in_flight=2)
    await small.recv()
    large = RawStream(pg_server, partner_token, max_in_flight=3)
    await large.recv()
    held_small = await small.instructions(2)
    held_large = await large.instructions(3)
    assert not {i.instruction_id for i in held_small} & {i.instruction_id for i in held_large}
    channel = pg_server.channel(await pg_server.credential("internal"))
    assert await ps.pipeline_counts(channel, partner_id) == {LEASED: 5, PENDING: 3}
    # A confirmation frees credit on its own stream only.
    small.confirm(held_small[0].instruction_id)
    (third,) = await small.instructions(1)
    assert third.instruction_id not in {i.instruction_id for i in held_small + held_large}
    assert await ps.pipeline_counts(channel, partner_id) == {LEASED: 5, PENDING: 2, CONFIRMED: 1}
    small.cut()
    large.cut()


async def test_two_streams_of_a_partner_share_the_work_without_overlap(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner()
    one, two = ps.RecordingPartner(), ps.RecordingPartner()
    async with (
        ps.running_worker(pg_server.channel(partner_token), one, max_in_flight=3),
        ps.running_worker(pg_server.channel(partner_token), two, max_in_flight=3),
    ):
        bound = await _bind_many(pg_server, partner_token, 30)

        async def all_confirmed() -> bool:
            rows = await ps.instructions_of(pg_server.app.runtime.db, partner_id)
            return len(rows) == 30 and all(r.state == "confirmed" for r in rows)

        await ps.eventually(all_confirmed, what="30 instructions confirmed")
    assert not set(one.opened) & set(two.opened)
    assert len(one.opened) + len(two.opened) == len(bound)


async def test_repeated_confirmation_is_ok_and_a_conflicting_one_refused(
    pg_server: RunningServer,
) -> None:
    _partner_id, partner_token = await pg_server.partner()
    await _bind_many(pg_server, partner_token, 2)
    partner = PartnerProvisioning(pg_server.channel(partner_token))
    done, failed = await partner.fetch(10)

    first = await partner.confirm(done.instruction_id, Done("sub-1"))
    again = await partner.confirm(done.instruction_id, Done("sub-1"))
    assert (first.outcome, first.state) == (ACCEPTED, CONFIRMED)
    assert (again.outcome, again.state) == (DUPLICATE, CONFIRMED)
    await expect_error(
        partner.confirm(done.instruction_id, Done("sub-2")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_CONFIRMATION_CONFLICT",
    )
    await expect_error(
        partner.confirm(done.instruction_id, Failed("no", retryable=False)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_CONFIRMATION_CONFLICT",
    )

    refused = await partner.confirm(failed.instruction_id, Failed("closed account", False))
    assert refused.state == pb.INSTRUCTION_STATE_FAILED
    assert (
        await partner.confirm(failed.instruction_id, Failed("closed account", False))
    ).outcome == (DUPLICATE)
    await expect_error(
        partner.confirm(failed.instruction_id, Failed("another reason", False)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_CONFIRMATION_CONFLICT",
    )


async def test_a_reference_and_a_reason_at_their_limits_are_accepted(
    pg_server: RunningServer,
) -> None:
    _partner_id, partner_token = await pg_server.partner()
    await _bind_many(pg_server, partner_token, 2)
    partner = PartnerProvisioning(pg_server.channel(partner_token))
    done, failed = await partner.fetch(10)
    await expect_error(
        partner.confirm(done.instruction_id, Done("r" * 129)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (await partner.confirm(done.instruction_id, Done("r" * 128))).outcome == ACCEPTED
    await expect_error(
        partner.confirm(failed.instruction_id, Failed("x" * 501, retryable=False)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    refused = await partner.confirm(failed.instruction_id, Failed("x" * 500, retryable=False))
    assert refused.outcome == ACCEPTED


async def test_unknown_and_foreign_instructions_are_not_found(pg_server: RunningServer) -> None:
    _, owner_token = await pg_server.partner()
    _, other_token = await pg_server.partner()
    await _bind_many(pg_server, owner_token, 1)
    (instruction,) = await PartnerProvisioning(pg_server.channel(owner_token)).fetch()
    other = PartnerProvisioning(pg_server.channel(other_token))
    for instruction_id in (instruction.instruction_id, str(uuid.uuid4())):
        await expect_error(
            other.confirm(instruction_id, Done()),
            grpc.StatusCode.NOT_FOUND,
            "ERROR_REASON_INSTRUCTION_NOT_FOUND",
        )
    detail = await expect_error(
        other.confirm("not-an-id", Done()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
    )
    assert set(detail.violations) == {"confirmation.instruction_id"}
    # On the stream a refused confirmation is answered, and the stream goes on.
    stream = RawStream(pg_server, other_token)
    await stream.recv()
    stream.confirm(instruction.instruction_id)
    (result,) = await stream.results(1)
    assert result.error_reason == "ERROR_REASON_INSTRUCTION_NOT_FOUND"
    stream.confirm(str(uuid.uuid4()))
    (result,) = await stream.results(1)
    assert result.error_reason == "ERROR_REASON_INSTRUCTION_NOT_FOUND"
    stream.cut()


async def test_late_confirmation_after_redelivery_still_counts_once(
    fast_server: RunningServer,
) -> None:
    partner_id, partner_token = await fast_server.partner()
    await _bind_many(fast_server, partner_token, 1)
    partner = PartnerProvisioning(fast_server.channel(partner_token))
    (first,) = await partner.fetch()
    redelivered: list[pb.Instruction] = []

    async def delivered_again() -> bool:
        redelivered.extend(await partner.fetch())
        return bool(redelivered)

    await ps.eventually(delivered_again, what="redelivery after the ack deadline")
    assert redelivered[0].instruction_id == first.instruction_id
    assert redelivered[0].attempt == 2
    late = await partner.confirm(first.instruction_id, Done("late"))
    assert late.outcome == ACCEPTED
    again = await partner.confirm(first.instruction_id, Done("late"))
    assert again.outcome == DUPLICATE
    activations = await ps.activations_per_binding(fast_server.app.runtime.db, partner_id)
    assert list(activations.values()) == [1]


async def test_open_stream_gets_an_unacknowledged_instruction_again_until_it_is_dead(
    fast_any_server: RunningServer,
) -> None:
    server = fast_any_server
    partner_id, partner_token = await server.partner()
    await _bind_many(server, partner_token, 1)
    internal = ps.stub(server, await server.credential("internal"))
    stream = RawStream(server, partner_token, max_in_flight=5)
    assert (await stream.recv()).WhichOneof("message") == "ready"

    # The stream stays open and never acknowledges: each ack deadline that
    # runs out brings the instruction back on the same stream, one attempt on.
    (first,) = await stream.instructions(1)
    (second,) = await stream.instructions(1)
    assert first.attempt == 1
    assert (second.instruction_id, second.attempt) == (first.instruction_id, 2)

    # After the last attempt (FAST: 2) runs out, it is dead, not sent again.
    async def is_dead() -> bool:
        listed = await internal.ListInstructions(
            pb.ListInstructionsRequest(partner_id=partner_id, state=DEAD)
        )
        return [r.instruction.instruction_id for r in listed.instructions] == [first.instruction_id]

    await ps.eventually(is_dead, what="dead after the last attempt")
    (record,) = await ps.instructions_of(server.app.runtime.db, partner_id)
    assert (record.state, record.attempts, record.lease_owner) == ("dead", 2, None)

    # The stream is still live and got nothing in between: the next thing on
    # it is the instruction replayed by an operator, counted from 1 again.
    await internal.ReplayInstruction(
        pb.ReplayInstructionRequest(request_id="replay", instruction_id=first.instruction_id)
    )
    (replayed,) = await stream.instructions(1)
    assert (replayed.instruction_id, replayed.attempt) == (first.instruction_id, 1)
    stream.confirm(replayed.instruction_id)
    assert [r.outcome for r in await stream.results(1)] == [ACCEPTED]
    # Confirmed, it is nobody's lease any more.
    (record,) = await ps.instructions_of(server.app.runtime.db, partner_id)
    assert (record.state, record.attempts, record.lease_owner) == ("confirmed", 1, None)
    stream.cut()


async def test_each_redelivery_waits_longer_for_its_confirmation(
    backoff_server: RunningServer,
) -> None:
    _, partner_token = await backoff_server.partner()
    await _bind_many(backoff_server, partner_token, 1)
    partner = PartnerProvisioning(backoff_server.channel(partner_token))
    leases: list[tuple[int, float, float]] = []

    async def fetch_next() -> bool:
        before = time.time()
        got = await partner.fetch()
        after = time.time()
        for instruction in got:
            end = instruction.lease_expire_time.ToMicroseconds() / 1e6
            # The lease began between the request and its answer.
            leases.append((instruction.attempt, end - after, end - before))
        return bool(got)

    for attempt in (1, 2, 3):
        await ps.eventually(fetch_next, what=f"delivery {attempt}")
    # The ack deadline (0.3 s), then doubled each time, up to the maximum (1 s).
    for (attempt, shortest, longest), expected in zip(leases, (0.3, 0.6, 1.0), strict=True):
        assert shortest <= expected <= longest + 0.002, (attempt, shortest, longest)
    assert [attempt for attempt, _, _ in leases] == [1, 2, 3]


def test_the_backoff_ceiling_never_cuts_a_lease_below_the_ack_deadline() -> None:
    timing = Timing(
        ack_deadline=30, backoff_factor=2, max_backoff=10, retry_delay=5, max_attempts=3
    )
    assert [timing.lease_for(n).total_seconds() for n in (1, 2, 3)] == [30, 30, 30]
    assert [timing.retry_after(n).total_seconds() for n in (1, 2, 3)] == [5, 10, 10]


async def test_a_partner_gets_its_instructions_oldest_first(any_server: RunningServer) -> None:
    _, partner_token = await any_server.partner()
    device_token = await any_server.credential("device")
    bound = [await ps.bind(any_server, device_token, partner_token) for _ in range(3)]
    # One at a time: each lease picks one of the due instructions.
    stream = RawStream(any_server, partner_token, max_in_flight=1)
    assert (await stream.recv()).WhichOneof("message") == "ready"
    taken = []
    for _ in range(3):
        (instruction,) = await stream.instructions(1)
        taken.append(instruction)
        stream.confirm(instruction.instruction_id)
    stream.cut()
    assert [i.binding_id for i in taken] == [b.binding.binding_id for b in bound]


async def test_instruction_never_confirmed_goes_dead_and_replay_revives_it(
    fast_server: RunningServer,
) -> None:
    partner_id, partner_token = await fast_server.partner()
    await _bind_many(fast_server, partner_token, 1)
    partner = PartnerProvisioning(fast_server.channel(partner_token))
    internal_channel = fast_server.channel(await fast_server.credential("internal"))
    internal = ps.stub(fast_server, await fast_server.credential("internal"))

    delivered: list[int] = []

    async def is_dead() -> bool:
        # Takes whatever is due, confirms nothing.
        delivered.extend(i.attempt for i in await partner.fetch())
        return (await ps.pipeline_counts(internal_channel, partner_id)) == {DEAD: 1}

    await ps.eventually(is_dead, what="dead after max attempts")
    assert delivered == [1, 2]
    listed = await internal.ListInstructions(
        pb.ListInstructionsRequest(partner_id=partner_id, state=DEAD)
    )
    (record,) = listed.instructions
    assert record.attempts == 2

    replayed = await internal.ReplayInstruction(
        pb.ReplayInstructionRequest(
            request_id="replay-1", instruction_id=record.instruction.instruction_id
        )
    )
    assert replayed.instruction.state == PENDING
    assert replayed.instruction.attempts == 0
    await expect_error(
        internal.ReplayInstruction(
            pb.ReplayInstructionRequest(
                request_id="replay-2", instruction_id=record.instruction.instruction_id
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_INSTRUCTION_NOT_DEAD",
    )
    (back,) = await partner.fetch()
    assert back.instruction_id == record.instruction.instruction_id
    assert (await partner.confirm(back.instruction_id, Done())).outcome == ACCEPTED


async def test_retryable_failure_is_delivered_again(fast_server: RunningServer) -> None:
    _, partner_token = await fast_server.partner()
    await _bind_many(fast_server, partner_token, 1)
    partner = PartnerProvisioning(fast_server.channel(partner_token))
    (first,) = await partner.fetch()
    failed_at = time.time()
    retry = await partner.confirm(first.instruction_id, Failed("busy", retryable=True))
    assert retry.outcome == pb.CONFIRMATION_OUTCOME_RETRY_SCHEDULED
    got: list[pb.Instruction] = []

    async def back() -> bool:
        got.extend(await partner.fetch())
        return bool(got)

    await ps.eventually(back, what="redelivery after a retryable failure")
    assert got[0].instruction_id == first.instruction_id
    # Not before the retry delay (FAST: 0.1 s): the lease (0.3 s) began after it.
    leased_at = got[0].lease_expire_time.ToMicroseconds() / 1e6 - FAST_ACK_DEADLINE
    assert leased_at >= failed_at + FAST_RETRY_DELAY - 0.002


async def test_retryable_failure_of_the_last_attempt_parks_the_instruction_dead(
    fast_server: RunningServer,
) -> None:
    _, partner_token = await fast_server.partner()
    await _bind_many(fast_server, partner_token, 1)
    partner = PartnerProvisioning(fast_server.channel(partner_token))
    (first,) = await partner.fetch()
    last: list[pb.Instruction] = []

    async def delivered_again() -> bool:
        last.extend(await partner.fetch())
        return bool(last)

    await ps.eventually(delivered_again, what="the last attempt (FAST: 2)")
    assert (last[0].instruction_id, last[0].attempt) == (first.instruction_id, 2)
    answer = await partner.confirm(first.instruction_id, Failed("busy", retryable=True))
    assert (answer.outcome, answer.state) == (pb.CONFIRMATION_OUTCOME_RETRY_SCHEDULED, DEAD)


async def test_stream_must_start_with_hello_and_only_partners_connect(
    pg_server: RunningServer,
) -> None:
    _, partner_token = await pg_server.partner()

    async def confirmation_first() -> AsyncIterator[pb.ConnectRequest]:
        yield pb.ConnectRequest(confirmation=pb.Confirmation(instruction_id=str(uuid.uuid4())))

    call = ps.stub(pg_server, partner_token).Connect(confirmation_first())
    await expect_error(
        call.read(), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_STREAM_HELLO_MISSING"
    )

    async def hello() -> AsyncIterator[pb.ConnectRequest]:
        yield pb.ConnectRequest(hello=pb.StreamHello())

    device_call = ps.stub(pg_server, await pg_server.credential("device")).Connect(hello())
    await expect_error(
        device_call.read(), grpc.StatusCode.PERMISSION_DENIED, "ERROR_REASON_CALLER_NOT_ALLOWED"
    )
    foreign = ps.stub(pg_server, partner_token).GetPipeline(
        pb.GetPipelineRequest(partner_id="somebody-else")
    )
    await expect_error(foreign, grpc.StatusCode.NOT_FOUND, "ERROR_REASON_PARTNER_NOT_FOUND")
