"""gRPC face of tether.binding.v1.Binding: checks the caller, translates
messages (convert.py, shared/convert.py), calls the domain."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession

from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1 import service_pb2, service_pb2_grpc
from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.binding import bindings, convert, eligible, importer
from tether.server.binding.changes import BindingChanges
from tether.server.binding.import_workers import ImportWorkers
from tether.server.binding.rate_limit import ReportRateLimiter
from tether.server.binding.reports import Outcome, PartnerOutcome, Report, Reporter
from tether.server.binding.store import BindingStore
from tether.server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Violations,
    invalid,
)
from tether.server.observability import fast, metrics
from tether.server.runtime import Runtime
from tether.server.shared import convert as shared_convert
from tether.server.shared.partners import get_partner
from tether.server.shared.subjects import Subject
from tether.server.storage.idempotency import Once
from tether.server.transport import paging
from tether.server.transport.principal import CallerKind, Principal, require
from tether.server.transport.request_ids import check_request_id
from tether.server.validation import check_slug

Context = grpc.aio.ServicerContext[Any, Any]

MAX_NAMED_PARTNERS = 100
MAX_ENTRIES_PER_CALL = 1000
MAX_IMPORT_BATCH = 10_000
# Initial metadata of an import whose header was accepted (the contract's words).
IMPORT_ACCEPTED = ("tether-import", "accepted")
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["Binding"].full_name


def _list_partner(caller: Principal, requested: str, path: str) -> str:
    """The partner whose list a call acts on: the caller's own, or the one named."""
    partner_id = caller.partner_scope(requested)
    if not partner_id:
        violations = Violations()
        violations.add(path, "required")
        violations.raise_if_any()
    return partner_id


def _entries(items: Any, path: str, violations: Violations, *, limit: int) -> list[eligible.Entry]:
    if not items:
        violations.add(path, "at least one is required")
    elif len(items) > limit:
        violations.add(path, f"at most {limit} per call")
        return []
    entries = []
    for i, item in enumerate(items):
        account = shared_convert.account(item.account, f"{path}[{i}].account", violations)
        eligible.check_reference(
            item.partner_reference, f"{path}[{i}].partner_reference", violations
        )
        if account is not None:
            entries.append(eligible.Entry(account, item.partner_reference))
    return entries


class BindingServicer(service_pb2_grpc.BindingServicer):
    def __init__(
        self,
        runtime: Runtime,
        store: BindingStore,
        changes: BindingChanges,
        import_workers: ImportWorkers,
    ) -> None:
        self._db = runtime.db
        self._store = store
        self._changes = changes
        self._digester = runtime.digester
        self._reporter = Reporter(runtime.digester, changes)
        self._limiter = ReportRateLimiter(
            runtime.redis,
            runtime.settings.report_rate_per_minute,
            runtime.settings.redis_timeout_seconds,
        )
        self._import_workers = import_workers

    async def ReportAccountUse(
        self, request: pb.ReportAccountUseRequest, context: Context
    ) -> pb.ReportAccountUseResponse:
        caller = require(CallerKind.DEVICE)
        violations = Violations()
        check_request_id(request.request_id, violations)
        device = shared_convert.device(request.device, "device", violations)
        account = None
        if not request.HasField("account"):
            violations.add("account", "required")
        else:
            account = shared_convert.account(request.account, "account", violations)
        if len(request.partner_ids) > MAX_NAMED_PARTNERS:
            violations.add("partner_ids", f"at most {MAX_NAMED_PARTNERS}")
        else:
            for i, partner_id in enumerate(request.partner_ids):
                check_slug(partner_id, f"partner_ids[{i}]", violations)
        violations.raise_if_any()
        assert device is not None and account is not None
        report = Report(account, device, tuple(request.partner_ids))
        # The rate limit's round trip overlaps the SQL work; it is awaited
        # before the transaction commits, so a limited call writes nothing.
        limit = asyncio.ensure_future(
            self._limiter.check(caller.credential_id, device.digest(self._digester))
        )
        # Should the transaction fail before awaiting it, its outcome is moot.
        limit.add_done_callback(lambda task: task.cancelled() or task.exception())

        once = Once(
            self._db, caller, "binding.ReportAccountUse", request, pb.ReportAccountUseResponse
        )
        return await self._store.report(
            once,
            self._reporter,
            report,
            # Awaited before the commit, also on failure: a limited call writes nothing.
            settle=lambda: limit,
            respond=_counted_response,
        )

    def _scope(self, caller: Principal, device_pb: Any, violations: Violations) -> bindings.Scope:
        """What a caller may see: its partner, or the device it names."""
        if caller.kind is CallerKind.PARTNER:
            return bindings.Scope(partner_id=caller.partner_id)
        if caller.kind is CallerKind.DEVICE:
            return bindings.Scope(device=shared_convert.device(device_pb, "device", violations))
        return bindings.Scope()

    async def GetBinding(
        self, request: pb.GetBindingRequest, context: Context
    ) -> pb.GetBindingResponse:
        caller = require(CallerKind.DEVICE, CallerKind.PARTNER, CallerKind.INTERNAL)
        violations = Violations()
        binding_id = shared_convert.binding_id(request.binding_id, "binding_id", violations)
        scope = self._scope(caller, request.device, violations)
        violations.raise_if_any()
        assert binding_id is not None
        async with self._db.sessions() as session:
            row = await bindings.get(session, self._digester, binding_id, scope)
        return pb.GetBindingResponse(binding=convert.binding_pb(row))

    async def ListBindings(
        self, request: pb.ListBindingsRequest, context: Context
    ) -> pb.ListBindingsResponse:
        caller = require(CallerKind.DEVICE, CallerKind.PARTNER, CallerKind.INTERNAL)
        which = request.WhichOneof("filter")
        if caller.kind is CallerKind.DEVICE and which != "device":
            raise PermissionDenied(
                ErrorReason.ERROR_REASON_CALLER_NOT_ALLOWED,
                "a device credential may only list the bindings of the device it names",
            )
        size = paging.page_size(request.page_size)
        violations = Violations()
        device: Subject | None = None
        account: Subject | None = None
        partner_id = ""
        if which is None:
            violations.add("filter", "set one of device, account or partner_id")
        elif which == "device":
            device = shared_convert.device(request.device, "device", violations)
        elif which == "account":
            partner_id = caller.partner_scope(request.account.partner_id)
            account = shared_convert.account(request.account.account, "account.account", violations)
        else:
            partner_id = _list_partner(caller, request.partner_id, "partner_id")
        violations.raise_if_any()
        # A device caller's filter is its device already.
        scope = bindings.Scope(partner_id=caller.partner_id)
        subject = device or account
        digest = subject.digest(self._digester).hex() if subject is not None else ""
        listing = f"bindings:{which}:{partner_id}:{digest}:{request.include_revoked}"
        after = _decode_binding_key(paging.decode(listing, request.page_token))
        which_filter = bindings.Filter(device, account, partner_id, request.include_revoked)
        async with self._db.sessions() as session:
            if partner_id:
                await get_partner(session, partner_id)
            rows = await bindings.list_bindings(
                session, self._digester, which_filter, scope=scope, after=after, limit=size + 1
            )
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = paging.encode(listing, [last.create_time.isoformat(), str(last.binding_id)])
        return pb.ListBindingsResponse(
            bindings=[convert.binding_pb(r) for r in rows[:size]], next_page_token=token
        )

    async def Unbind(self, request: pb.UnbindRequest, context: Context) -> pb.UnbindResponse:
        caller = require(CallerKind.DEVICE, CallerKind.PARTNER, CallerKind.INTERNAL)
        violations = Violations()
        check_request_id(request.request_id, violations)
        binding_id = shared_convert.binding_id(request.binding_id, "binding_id", violations)
        scope = self._scope(caller, request.device, violations)
        violations.raise_if_any()
        assert binding_id is not None

        async def work(session: AsyncSession) -> pb.UnbindResponse:
            row = await bindings.unbind(
                session, self._digester, binding_id, scope, self._changes.listeners
            )
            return pb.UnbindResponse(binding=convert.binding_pb(row))

        once = Once(self._db, caller, "binding.Unbind", request, pb.UnbindResponse)
        return await once.run(work)

    async def AddEligibleAccounts(
        self, request: pb.AddEligibleAccountsRequest, context: Context
    ) -> pb.AddEligibleAccountsResponse:
        caller = require(CallerKind.PARTNER, CallerKind.ADMIN)
        partner_id = _list_partner(caller, request.partner_id, "partner_id")
        violations = Violations()
        entries = _entries(request.entries, "entries", violations, limit=MAX_ENTRIES_PER_CALL)
        violations.raise_if_any()
        async with self._db.transaction() as session:
            result = await eligible.add(session, self._digester, partner_id, entries)
        return pb.AddEligibleAccountsResponse(
            added_count=result.added, updated_count=result.updated
        )

    async def RemoveEligibleAccounts(
        self, request: pb.RemoveEligibleAccountsRequest, context: Context
    ) -> pb.RemoveEligibleAccountsResponse:
        caller = require(CallerKind.PARTNER, CallerKind.ADMIN)
        partner_id = _list_partner(caller, request.partner_id, "partner_id")
        violations = Violations()
        accounts: list[Subject] = []
        if not request.accounts:
            violations.add("accounts", "at least one is required")
        elif len(request.accounts) > MAX_ENTRIES_PER_CALL:
            violations.add("accounts", f"at most {MAX_ENTRIES_PER_CALL} per call")
        else:
            for i, item in enumerate(request.accounts):
                account = shared_convert.account(item, f"accounts[{i}]", violations)
                if account is not None:
                    accounts.append(account)
        violations.raise_if_any()
        async with self._db.transaction() as session:
            removed = await eligible.remove(session, self._digester, partner_id, accounts)
        return pb.RemoveEligibleAccountsResponse(removed_count=removed)

    async def ImportEligibleAccounts(
        self, request_iterator: AsyncIterator[pb.ImportEligibleAccountsRequest], context: Context
    ) -> pb.ImportEligibleAccountsResponse:
        caller = require(CallerKind.PARTNER, CallerKind.ADMIN)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("item") != "header":
            raise FailedPrecondition(
                ErrorReason.ERROR_REASON_IMPORT_HEADER_MISSING,
                "the first message of an import must be its header",
            )
        header = first.header
        partner_id = _list_partner(caller, header.partner_id, "header.partner_id")
        violations = Violations()
        if header.mode not in (pb.IMPORT_MODE_APPEND, pb.IMPORT_MODE_REPLACE):
            violations.add("header.mode", "required: IMPORT_MODE_APPEND or IMPORT_MODE_REPLACE")
        if header.max_rejected < 0:
            violations.add("header.max_rejected", "must be 0 or more")
        violations.raise_if_any()
        spec = importer.ImportSpec(
            partner_id,
            replace=header.mode == pb.IMPORT_MODE_REPLACE,
            max_rejected=header.max_rejected,
            strict=header.strict,
        )
        run = importer.ImportRun(
            self._db, self._store, self._digester, spec, self._import_workers.get()
        )
        # Tells the client the header was accepted: a long upload can start
        # knowing that its partner and mode are right.
        await context.send_initial_metadata((IMPORT_ACCEPTED,))
        try:
            async for message in request_iterator:
                await run.add(_import_batch(message))
            result = await run.finish()
        except BaseException:
            # Failed or cancelled: the import rolls back before the call ends.
            await run.abort()
            raise
        metrics.IMPORT_ROWS.inc(result.imported)
        metrics.IMPORT_REJECTED.inc(result.rejected)
        return pb.ImportEligibleAccountsResponse(
            received_count=result.received,
            imported_count=result.imported,
            rejected_count=result.rejected,
            removed_count=result.removed,
            rejected=[
                pb.RejectedEntry(index=r.index, field=r.field, description=r.description)
                for r in result.rejections
            ],
        )

    async def ListEligibleAccounts(
        self, request: pb.ListEligibleAccountsRequest, context: Context
    ) -> pb.ListEligibleAccountsResponse:
        caller = require(CallerKind.PARTNER, CallerKind.ADMIN, CallerKind.INTERNAL)
        partner_id = _list_partner(caller, request.partner_id, "partner_id")
        size = paging.page_size(request.page_size)
        listing = f"eligible:{partner_id}"
        after = paging.decode(listing, request.page_token)
        if after is not None and not isinstance(after, int):
            raise _page_token_invalid()
        async with self._db.sessions() as session:
            rows = await eligible.list_entries(session, partner_id, after, size + 1)
        token = paging.encode(listing, rows[size - 1].entry_id) if len(rows) > size else ""
        return pb.ListEligibleAccountsResponse(
            entries=[convert.entry_pb(r) for r in rows[:size]], next_page_token=token
        )


def _import_batch(message: pb.ImportEligibleAccountsRequest) -> list[importer.RawEntry]:
    """The entries of one stream message after the header, as plain values."""
    if message.WhichOneof("item") != "batch":
        raise invalid("header", "only the first message may be a header")
    items = message.batch.entries
    if not items or len(items) > MAX_IMPORT_BATCH:
        raise invalid("batch.entries", f"1-{MAX_IMPORT_BATCH:,} entries per batch")
    return convert.import_batch(items)


def _decode_binding_key(key: Any) -> bindings.PageKey | None:
    if key is None:
        return None
    try:
        time, binding_id = key
        return datetime.fromisoformat(time), uuid.UUID(binding_id)
    except (TypeError, ValueError) as exc:
        raise _page_token_invalid() from exc


def _page_token_invalid() -> InvalidArgument:
    return InvalidArgument(
        ErrorReason.ERROR_REASON_PAGE_TOKEN_INVALID,
        "page_token does not belong to this listing; start again without it",
        violations=[FieldViolation("page_token", "not a token of this listing")],
    )


_OUTCOME_COUNTERS = {
    outcome: fast.increment(metrics.REPORTS.labels(outcome.value)) for outcome in Outcome
}


def _counted_response(outcomes: list[PartnerOutcome]) -> pb.ReportAccountUseResponse:
    """The report's answer, each partner's outcome counted as it is made."""
    for each in outcomes:
        _OUTCOME_COUNTERS[each.outcome](1)
    return convert.report_response(outcomes)
