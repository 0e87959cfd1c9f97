"""gRPC face of tether.guard.v1.FingerprintGuard: checks the caller,
translates messages (convert.py), calls the Guard."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Any

import grpc

from tether.guard.v1 import messages_pb2 as pb
from tether.guard.v1 import service_pb2, service_pb2_grpc
from tether.server import errors
from tether.server.errors import Violations
from tether.server.guard import backtest, convert, corrections, links, policies, rebuild
from tether.server.guard.fingerprint import check_identity
from tether.server.guard.policies import Policy
from tether.server.guard.service import Guard, Verdict, counters_answer
from tether.server.runtime import Runtime
from tether.server.transport import paging
from tether.server.transport.convert import timestamp
from tether.server.transport.principal import CallerKind, require
from tether.server.transport.request_check import check, checks_own_messages
from tether.server.validation import check_slug

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["FingerprintGuard"].full_name

# Web front-ends' back-ends and internal services; see service.proto.
CALLERS = (CallerKind.INTERNAL,)
OPERATORS = (CallerKind.INTERNAL, CallerKind.ADMIN)
_MASKABLE = (policies.FIELD_NAMES - {"service_id", "allowed_account_digests"}) | {
    "allowed_accounts"
}


class GuardServicer(service_pb2_grpc.FingerprintGuardServicer):
    def __init__(self, runtime: Runtime, guard: Guard) -> None:
        self._db = runtime.db
        self._guard = guard

    async def Evaluate(self, request: pb.EvaluateRequest, context: Context) -> pb.EvaluateResponse:
        require(*CALLERS)
        return convert.verdict(await self._guard.evaluate(convert.evaluate_call(request)))

    async def CancelRegistration(
        self, request: pb.CancelRegistrationRequest, context: Context
    ) -> pb.CancelRegistrationResponse:
        require(*CALLERS)
        cancelled = await self._guard.cancel_registration(
            request.service_id,
            request.identity,
            convert.account(request.account, request.HasField("account")),
        )
        return pb.CancelRegistrationResponse(cancelled=cancelled)

    async def EndLogin(self, request: pb.EndLoginRequest, context: Context) -> pb.EndLoginResponse:
        require(*CALLERS)
        ended = await self._guard.end_login(
            request.service_id,
            request.identity,
            convert.account(request.account, request.HasField("account")),
        )
        return pb.EndLoginResponse(ended=ended)

    async def RenewLogin(
        self, request: pb.RenewLoginRequest, context: Context
    ) -> pb.RenewLoginResponse:
        require(*CALLERS)
        expire_time = await self._guard.renew_login(
            request.service_id,
            request.identity,
            convert.account(request.account, request.HasField("account")),
        )
        return pb.RenewLoginResponse(expire_time=timestamp(expire_time))

    async def LeaveRoom(
        self, request: pb.LeaveRoomRequest, context: Context
    ) -> pb.LeaveRoomResponse:
        require(*CALLERS)
        left = await self._guard.leave_room(
            request.service_id,
            request.room_id,
            request.identity,
            convert.account(request.account, request.HasField("account")),
        )
        return pb.LeaveRoomResponse(left=left)

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: Context
    ) -> pb.GetPolicyResponse:
        require(*OPERATORS)
        violations = Violations()
        check_slug(request.service_id, "service_id", violations)
        violations.raise_if_any()
        async with self._db.sessions() as session:
            policy = await policies.get(session, request.service_id)
        return pb.GetPolicyResponse(policy=convert.policy_pb(policy))

    async def ListPolicies(
        self, request: pb.ListPoliciesRequest, context: Context
    ) -> pb.ListPoliciesResponse:
        require(*OPERATORS)
        size = paging.page_size(request.page_size)
        after = paging.decode("guard-policies", request.page_token) or ""
        async with self._db.sessions() as session:
            rows = await policies.list_after(session, str(after), size + 1)
        token = (
            paging.encode("guard-policies", rows[size - 1].service_id) if len(rows) > size else ""
        )
        return pb.ListPoliciesResponse(
            policies=[convert.policy_pb(p) for p in rows[:size]], next_page_token=token
        )

    async def SetPolicy(
        self, request: pb.SetPolicyRequest, context: Context
    ) -> pb.SetPolicyResponse:
        require(*OPERATORS)
        violations = Violations()
        given = convert.policy_fields(request.policy, violations)
        mask = list(request.update_mask.paths)
        for path in mask:
            if path not in _MASKABLE:
                violations.add("update_mask", f"unknown or read-only field {path!r}")
        digests: list[str] = []
        for i, account in enumerate(request.allowed_accounts):
            ref = convert.account(account, True)
            assert ref is not None
            digest = self._guard.account_digest(ref, f"allowed_accounts[{i}]", violations)
            if digest is not None:
                digests.append(digest)
        check_slug(request.policy.service_id, "policy.service_id", violations)
        violations.raise_if_any()
        if not mask:
            policy = Policy(**given, allowed_account_digests=tuple(digests))  # type: ignore[arg-type]
        else:
            async with self._db.sessions() as session:
                current = await policies.find(session, request.policy.service_id)
            changes = {k: given[k] for k in mask if k != "allowed_accounts"}
            if "allowed_accounts" in mask:
                changes["allowed_account_digests"] = tuple(digests)
            base = current or Policy(request.policy.service_id)
            policy = replace(base, **changes)  # type: ignore[arg-type]
        stored = await self._guard.set_policy(policy)
        return pb.SetPolicyResponse(policy=convert.policy_pb(stored))

    async def ListIdentityAccounts(
        self, request: pb.ListIdentityAccountsRequest, context: Context
    ) -> pb.ListIdentityAccountsResponse:
        require(*OPERATORS)
        violations = Violations()
        check_identity(request.identity, "identity", violations)
        if request.service_id:
            check_slug(request.service_id, "service_id", violations)
        violations.raise_if_any()
        size = paging.page_size(request.page_size)
        scope = f"guard-identity:{request.identity}:{request.service_id}"
        after = paging.decode(scope, request.page_token)
        book = self._guard.book
        identities = sorted({request.identity, *book.members(book.find(request.identity))})
        async with self._db.sessions() as session:
            rows, last = await links.identity_accounts(
                session, identities, request.service_id, after, size
            )
        return pb.ListIdentityAccountsResponse(
            links=[convert.link_pb(r) for r in rows],
            next_page_token=paging.encode(scope, last) if last else "",
        )

    async def ListAccountIdentities(
        self, request: pb.ListAccountIdentitiesRequest, context: Context
    ) -> pb.ListAccountIdentitiesResponse:
        require(*OPERATORS)
        violations = Violations()
        ref = convert.account(request.account, request.HasField("account"))
        digests = self._guard.account_candidates(ref, "account", violations)
        if request.service_id:
            check_slug(request.service_id, "service_id", violations)
        violations.raise_if_any()
        size = paging.page_size(request.page_size)
        scope = f"guard-account:{digests[0].hex()}:{request.service_id}"
        after = paging.decode(scope, request.page_token)
        async with self._db.sessions() as session:
            rows, last = await links.account_identities(
                session, digests, request.service_id, after, size
            )
        return pb.ListAccountIdentitiesResponse(
            links=[convert.link_pb(r) for r in rows],
            next_page_token=paging.encode(scope, last) if last else "",
        )

    async def RebuildCounters(
        self, request: pb.RebuildCountersRequest, context: Context
    ) -> pb.RebuildCountersResponse:
        require(*OPERATORS)
        if request.service_id:
            violations = Violations()
            check_slug(request.service_id, "service_id", violations)
            violations.raise_if_any()
        with counters_answer():
            restored = await rebuild.rebuild(self._guard, request.service_id)
        return pb.RebuildCountersResponse(entries_restored=restored)

    async def ExplainIdentity(
        self, request: pb.ExplainIdentityRequest, context: Context
    ) -> pb.ExplainIdentityResponse:
        require(*OPERATORS)
        return convert.identity_view(await corrections.explain(self._guard, request.identity))

    async def UnlinkFingerprint(
        self, request: pb.UnlinkFingerprintRequest, context: Context
    ) -> pb.UnlinkFingerprintResponse:
        caller = require(*OPERATORS)
        with counters_answer():
            identity, previous = await corrections.unlink(
                self._guard, request.fingerprint, request.reason, caller.credential_id
            )
        return pb.UnlinkFingerprintResponse(identity=identity, previous_identity=previous)

    async def MergeIdentities(
        self, request: pb.MergeIdentitiesRequest, context: Context
    ) -> pb.MergeIdentitiesResponse:
        caller = require(*OPERATORS)
        with counters_answer():
            identity = await corrections.merge(
                self._guard, request.identity, request.other, request.reason, caller.credential_id
            )
        return pb.MergeIdentitiesResponse(identity=identity)

    # Walking every text of every event for a NUL cost more than deciding
    # some of them: the events get the guard's own checks (backtest.py).
    @checks_own_messages
    async def Backtest(
        self, requests: AsyncIterator[pb.BacktestRequest], context: Context
    ) -> AsyncIterator[pb.BacktestResponse]:
        require(*OPERATORS)
        first = await anext(aiter(requests), None)
        check(first)
        if first is None or not first.HasField("start"):
            raise errors.invalid("start", "required: the first message is a BacktestStart")
        start = first.start
        violations = Violations()
        fields = convert.policy_fields(start.policy, violations)
        policy = backtest.check_start(
            Policy(**fields),  # type: ignore[arg-type]
            list(start.group_by),
            violations,
        )
        run = backtest.Backtest(self._guard, policy, list(start.group_by), explained=start.verdicts)
        with counters_answer():
            async for response in self._replay(run, requests, start.verdicts):
                yield response

    async def _replay(
        self,
        run: backtest.Backtest,
        requests: AsyncIterator[pb.BacktestRequest],
        verdicts: bool,
    ) -> AsyncIterator[pb.BacktestResponse]:
        index = 0
        done: list[tuple[int, Verdict | str]]
        try:
            async for message in requests:
                events = _events_of(message)
                if events is None:
                    events = ()
                    run.summary.rejected += 1
                    if verdicts:
                        yield _verdict(index, "expected events: the start comes only first")
                    index += 1
                for event in events:
                    problem = backtest.check_event(event)
                    if problem:
                        run.summary.rejected += 1
                        done = [(index, problem)]
                    else:
                        done = await run.add(index, convert.backtest_event(event))
                    index += 1
                    if verdicts:
                        for item in done:
                            yield _verdict(*item)
            for item in await run.finish():
                if verdicts:
                    yield _verdict(*item)
        finally:
            await run.drop()
        yield pb.BacktestResponse(summary=convert.backtest_summary(run.summary))


def _events_of(message: pb.BacktestRequest) -> Iterable[pb.BacktestEvent] | None:
    """A message's events; None for a message that carries none (a second start)."""
    kind = message.WhichOneof("kind")
    if kind == "event":
        return (message.event,)
    if kind == "events":
        return message.events.events
    return None


def _verdict(index: int, value: Verdict | str) -> pb.BacktestResponse:
    if isinstance(value, str):
        return pb.BacktestResponse(verdict=pb.BacktestVerdict(index=index, error_message=value))
    return pb.BacktestResponse(
        verdict=pb.BacktestVerdict(index=index, response=convert.verdict(value))
    )
