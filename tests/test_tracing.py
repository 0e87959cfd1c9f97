"""OpenTelemetry tracing through real gRPC calls: the caller's traceparent
continued, SQL and Redis spans under the call's span, and an instruction's
delivery and confirmation linked to the report that wrote it. Spans are
caught by the SDK's in-memory exporter."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests import binding_support as bs
from tests import provisioning_support as ps
from tests.guard_support import fingerprint, guard_client, new_service
from tests.support import RunningServer, expect_error, start_server
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as guard_pb
from tether.provisioning.v1 import messages_pb2 as provisioning_pb

REPORT = "tether.binding.v1.Binding/ReportAccountUse"


@pytest.fixture(scope="module")
async def traced(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RunningServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("tracing"),
        tracer_provider=provider,
        database_pool_size=3,
    )
    yield server, exporter
    await server.stop()
    provider.shutdown()


def caller_context() -> tuple[int, int, tuple[tuple[str, str], ...]]:
    """A caller's trace and span ids, and the metadata that carries them."""
    trace_id, span_id = secrets.randbits(128) or 1, secrets.randbits(64) or 1
    return trace_id, span_id, (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-01"),)


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def server_span(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == name and s.kind is SpanKind.SERVER]
    return found


async def spans_when(
    exporter: InMemorySpanExporter, trace_id: int, done: str
) -> list[ReadableSpan]:
    """The trace's spans once one named `done` has ended (SQL spans are
    reported just after their statement, possibly after the answer)."""
    found: list[ReadableSpan] = []

    async def ended() -> bool:
        nonlocal found
        found = in_trace(exporter, trace_id)
        return any(s.name.startswith(done) for s in found)

    await ps.eventually(ended, what=f"a span {done} in the trace")
    return found


async def test_a_report_continues_the_callers_trace_with_sql_and_redis_spans_under_it(
    traced: tuple[RunningServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    _, partner_token = await server.partner()
    account_ = bs.phone_account()
    await bs.add_accounts(server, partner_token, [account_])
    devices = bs.stub(server, await server.credential("device"))
    trace_id, caller_span, metadata = caller_context()

    response = await devices.ReportAccountUse(
        bs.report_request(bs.device(), account_), metadata=metadata
    )
    assert response.outcomes[0].outcome == binding_pb.REPORT_OUTCOME_BOUND

    await spans_when(exporter, trace_id, REPORT)
    spans = await spans_when(exporter, trace_id, "redis binding.rate_limit")
    rpc = server_span(spans, REPORT)
    assert rpc.parent is not None and rpc.parent.span_id == caller_span
    assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == 0
    children = [
        s for s in spans if s.parent is not None and s.parent.span_id == rpc.context.span_id
    ]
    assert any(
        s.name.startswith("postgresql ")
        and s.attributes
        and "INSERT" in str(s.attributes["db.statement"])
        for s in children
    ), [s.name for s in children]
    assert any(s.name == "redis binding.rate_limit" for s in children)


async def test_an_evaluate_has_its_redis_script_call_as_a_child_span(
    traced: tuple[RunningServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    guard = await guard_client(server)
    service = await new_service(guard, login_limit=3)
    trace_id, _, metadata = caller_context()

    verdict = await guard.stub.Evaluate(
        guard_pb.EvaluateRequest(
            service_id=service,
            action=guard_pb.ACTION_LOGIN,
            account=account("someone"),
            components=fingerprint("traced"),
            client_ip="198.51.100.20",
        ),
        metadata=metadata,
    )
    assert verdict.verdict == guard_pb.VERDICT_ALLOW

    spans = await spans_when(exporter, trace_id, "redis guard.evaluate")
    rpc = server_span(spans, "tether.guard.v1.FingerprintGuard/Evaluate")
    (script,) = [s for s in spans if s.name == "redis guard.evaluate"]
    assert script.parent is not None and script.parent.span_id == rpc.context.span_id
    assert script.kind is SpanKind.CLIENT


async def test_a_refused_call_is_traced_with_its_final_status(
    traced: tuple[RunningServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    trace_id, _, metadata = caller_context()
    stranger = bs.stub(server, "not-a-token")

    await expect_error(
        stranger.ReportAccountUse(
            bs.report_request(bs.device(), bs.phone_account()), metadata=metadata
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )

    rpc = server_span(await spans_when(exporter, trace_id, REPORT), REPORT)
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


async def test_delivery_and_confirmation_link_to_the_report_that_wrote_the_instruction(
    traced: tuple[RunningServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    partner_id, partner_token = await server.partner(services=("free-data",))
    account_ = bs.phone_account()
    await bs.add_accounts(server, partner_token, [account_])
    devices = bs.stub(server, await server.credential("device"))
    trace_id, _, metadata = caller_context()
    await devices.ReportAccountUse(bs.report_request(bs.device(), account_), metadata=metadata)
    report = server_span(await spans_when(exporter, trace_id, REPORT), REPORT)

    partner = ps.RecordingPartner()
    async with ps.running_worker(server.channel(partner_token), partner):

        def linked(name: str) -> list[ReadableSpan]:
            return [
                s
                for s in exporter.get_finished_spans()
                if s.name == name
                and any(
                    link.context.trace_id == trace_id
                    and link.context.span_id == report.context.span_id
                    for link in s.links
                )
            ]

        async def confirmed() -> bool:
            return bool(linked("provisioning.deliver")) and bool(linked("provisioning.confirm"))

        await ps.eventually(confirmed, what="delivery and confirmation spans linked to the report")
    (delivery,) = linked("provisioning.deliver")
    assert delivery.attributes is not None
    assert delivery.attributes["tether.partner_id"] == partner_id
    assert delivery.attributes["tether.instruction_kind"] == "open"
    # Both sit in the partner stream's own trace, under its Connect span
    # (ended once the server has seen the stream close).
    connect: list[ReadableSpan] = []

    async def stream_ended() -> bool:
        nonlocal connect
        connect = [
            s
            for s in exporter.get_finished_spans()
            if s.context.trace_id == delivery.context.trace_id and s.kind is SpanKind.SERVER
        ]
        return bool(connect)

    await ps.eventually(stream_ended, what="the Connect span ended")
    assert [s.name for s in connect] == ["tether.provisioning.v1.Provisioning/Connect"]
    assert delivery.parent is not None and delivery.parent.span_id == connect[0].context.span_id
    (confirmation,) = linked("provisioning.confirm")
    assert confirmation.context.trace_id == delivery.context.trace_id


async def test_a_fetched_instruction_is_marked_in_the_fetch_and_linked_to_its_report(
    traced: tuple[RunningServer, InMemorySpanExporter],
) -> None:
    server, exporter = traced
    _, partner_token = await server.partner(services=("free-data",))
    account_ = bs.phone_account()
    await bs.add_accounts(server, partner_token, [account_])
    devices = bs.stub(server, await server.credential("device"))
    trace_id, _, metadata = caller_context()
    await devices.ReportAccountUse(bs.report_request(bs.device(), account_), metadata=metadata)
    report = server_span(await spans_when(exporter, trace_id, REPORT), REPORT)
    fetch_trace, _, fetch_metadata = caller_context()

    fetched = await ps.stub(server, partner_token).FetchInstructions(
        provisioning_pb.FetchInstructionsRequest(request_id=secrets.token_hex(8)),
        metadata=fetch_metadata,
    )

    (instruction,) = fetched.instructions
    spans = await spans_when(exporter, fetch_trace, "tether.provisioning.v1.Provisioning/Fetch")
    fetch = server_span(spans, "tether.provisioning.v1.Provisioning/FetchInstructions")
    (delivery,) = [s for s in spans if s.name == "provisioning.deliver"]
    assert delivery.parent is not None and delivery.parent.span_id == fetch.context.span_id
    assert delivery.attributes is not None
    assert delivery.attributes["tether.instruction_id"] == instruction.instruction_id
    assert [(link.context.trace_id, link.context.span_id) for link in delivery.links] == [
        (trace_id, report.context.span_id)
    ]
