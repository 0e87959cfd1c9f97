"""The web side shares the process with gRPC, so a hostile HTTP client must
not be able to take it down: connections are bounded in number and closed
once silent; malformed HTTP, odd charsets, undecodable bodies and odd paths
get a 4xx, never a 500 or a logged traceback. Run against a real server."""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.guard_support import fingerprint, web_of
from tests.support import RunningServer, start_server
from tether.server.guard.web.addresses import client_ip, parse_networks
from tether.server.guard.web.connections import Bounds

LIMIT = 8
IDLE = 0.5


@pytest.fixture
async def bounded(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    """A server whose web side holds LIMIT connections, each silent IDLE seconds
    at most, and believes X-Forwarded-For from 127.0.0.1."""
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path,
        guard_web_max_connections=LIMIT,
        guard_web_idle_seconds=IDLE,
        guard_trusted_proxies="127.0.0.1",
    )
    yield server
    await server.stop()


async def _connect(server: RunningServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", web_of(server).port)


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (a bound on the
    wait only, so a connection left open fails the test instead of hanging it)."""
    return await asyncio.wait_for(reader.read(), 30)


async def _healthy(server: RunningServer) -> bool:
    stub = health_pb2_grpc.HealthStub(server.channel(server.admin_token))
    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"GET /demo/register HT",
        b"POST /guard/evaluate HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n\r\n{}",
        b"GET /demo/register HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["nothing", "half a request line", "a body that never comes", "idle after a request"],
)
async def test_a_silent_connection_is_closed(bounded: RunningServer, sent: bytes) -> None:
    reader, writer = await _connect(bounded)
    writer.write(sent)
    await writer.drain()
    got = await _closed_by_server(reader)
    # Only the idle one got an answer, before it was closed.
    assert got.startswith(b"HTTP/1.1 200") == sent.endswith(b"\r\n\r\n")
    writer.close()


async def test_connections_beyond_the_limit_are_closed_and_grpc_still_answers(
    bounded: RunningServer,
) -> None:
    held = [await _connect(bounded) for _ in range(LIMIT)]
    # Each held connection is known to the server once it answers on it.
    for reader, writer in held:
        writer.write(b"GET /demo/register HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    reader, writer = await _connect(bounded)
    assert await _closed_by_server(reader) == b""
    writer.close()
    assert await _healthy(bounded)
    # Closing one frees its place.
    held[0][1].close()
    await held[0][1].wait_closed()
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"{web_of(bounded).url}/demo/register") as response:
                    assert response.status == 200
                    break
            except aiohttp.ServerDisconnectedError:
                # The server may not have seen the close yet: ask again.
                await asyncio.sleep(0.01)
        else:
            pytest.fail("no connection admitted after one was closed")
    for _, writer in held[1:]:
        writer.close()


def test_one_client_address_holds_at_most_its_share_but_a_trusted_proxy_more() -> None:
    bounds = Bounds(
        asyncio.Protocol,
        parse_networks("10.0.0.1"),
        limit=100,
        idle=1.0,
        per_client=3,
    )
    assert [bounds.admit("192.0.2.1") for _ in range(4)] == [True, True, True, False]
    assert bounds.admit("192.0.2.2")
    assert all(bounds.admit("10.0.0.1") for _ in range(10))
    bounds.release("192.0.2.1")
    assert bounds.admit("192.0.2.1")
    assert bounds.open == 3 + 1 + 10


async def _raw(server: RunningServer, request: bytes) -> bytes:
    reader, writer = await _connect(server)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)
    writer.close()
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        ("GET /demo/r\u00e9gister HTTP/1.1\r\nHost: x\r\n\r\n".encode(), b"400"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /guard/static/" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (
            b"POST /guard/evaluate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json; "
            b"charset=foobar\r\nContent-Length: 2\r\n\r\n{}",
            b"400",
        ),
        (
            b"POST /guard/evaluate HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: 10\r\n\r\n0123456789",
            b"400",
        ),
    ],
    ids=[
        "raw UTF-8 in the path",
        "a path over 8 KiB",
        "an asterisk",
        "a static name over 255",
        "an unknown charset",
        "a gzip body that is not",
    ],
)
async def test_malformed_http_is_a_client_error_and_logs_no_traceback(
    bounded: RunningServer,
    request_bytes: bytes,
    status: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        answer = await _raw(bounded, request_bytes)
    assert answer.split()[1] == status, answer
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_a_well_formed_gzip_body_is_still_read(bounded: RunningServer) -> None:
    body = gzip.compress(b'{"action": "register"}')
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{web_of(bounded).url}/guard/evaluate",
            data=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as response,
    ):
        # Read and checked: the fields it lacks are named.
        assert response.status == 400
        assert "components" in (await response.json())["violations"]


async def test_a_proxy_s_own_x_forwarded_for_line_is_the_one_believed(
    bounded: RunningServer,
) -> None:
    # A proxy that adds its own line (HAProxy's option forwardfor) leaves the
    # client's line first: the right-most hop is the proxy's word.
    components = json_format.MessageToDict(fingerprint("xff"), preserving_proto_field_name=True)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{web_of(bounded).url}/guard/evaluate",
            json={"action": "register", "account": "xff-1", "components": components},
            headers=[("X-Forwarded-For", "not-an-address"), ("X-Forwarded-For", "203.0.113.7")],
        ) as response,
    ):
        assert response.status == 200, await response.text()
        assert (await response.json())["verdict"] == "allow"


def test_a_hop_with_a_port_or_brackets_is_its_address() -> None:
    proxies = parse_networks("10.0.0.0/8")
    assert client_ip("10.1.2.3", "198.51.100.1:8080", proxies) == "198.51.100.1"
    assert client_ip("10.1.2.3", "[2001:db8::1]:443", proxies) == "2001:db8::1"
    assert client_ip("10.1.2.3", "[2001:db8::1], 10.9.9.9:80", proxies) == "2001:db8::1"
    assert client_ip("10.1.2.3", "2001:db8::2", proxies) == "2001:db8::2"
