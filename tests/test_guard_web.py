"""The web side's JSON endpoints: shape, types and size are checked; the
client IP comes from the connection (or a trusted proxy), never the body;
logging out and leaving a room free the very slots the gRPC API counts."""

from __future__ import annotations

from typing import Any

import aiohttp
from google.protobuf import json_format

from tests.guard_support import fingerprint, guard_client, guard_of, web_of
from tests.support import RunningServer
from tether.clients.guard.client import account
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard.web.addresses import client_ip, parse_networks

IP = "198.51.100.7"


def _components() -> dict[str, Any]:
    return json_format.MessageToDict(fingerprint("web"), preserving_proto_field_name=True)


async def _post(
    server: RunningServer, body: Any, path: str = "/guard/evaluate"
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{web_of(server).url}{path}", json=body) as response,
    ):
        return response.status, await response.json()


async def test_demo_endpoint_runs_the_same_guard_as_grpc(pg_server: RunningServer) -> None:
    status, verdict = await _post(
        pg_server, {"action": "register", "account": "web-1", "components": _components()}
    )
    assert status == 200
    assert verdict["verdict"] == "allow"
    guard = await guard_client(pg_server)
    await guard_of(pg_server).recorder.flush()
    links = [link async for link in guard.identity_accounts(verdict["identity"])]
    assert [link.service_id for link in links] == [pg_server.app.settings.guard_demo_service]


async def test_demo_endpoint_rejects_wrong_types_with_every_field(
    pg_server: RunningServer,
) -> None:
    components = {**_components(), "screen_width": "wide", "fonts": "Arial", "client_ip": "1.2.3.4"}
    status, problem = await _post(
        pg_server, {"action": "register", "account": 7, "components": components}
    )
    assert status == 400
    assert set(problem["violations"]) == {
        "account",
        "components.screen_width",
        "components.fonts",
        "components.client_ip",
    }
    status, problem = await _post(pg_server, {"action": "fly", "account": "a", "components": {}})
    assert status == 400
    assert "action" in problem["violations"]
    # A number no float holds is a wrong type too, not a failure of the server.
    components = {**_components(), "pixel_ratio": 10**400}
    status, problem = await _post(
        pg_server, {"action": "register", "account": "a", "components": components}
    )
    assert status == 400
    assert set(problem["violations"]) == {"components.pixel_ratio"}


async def test_demo_endpoint_refuses_json_nested_too_deeply(pg_server: RunningServer) -> None:
    async with aiohttp.ClientSession() as session:
        for body in ("[" * 5000, '{"a": ' * 5000):
            async with session.post(
                f"{web_of(pg_server).url}/guard/evaluate",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 400
                assert (await response.json())["error"].startswith("the body must be a JSON")


async def test_a_value_with_a_trailing_newline_is_refused_not_taken_as_another(
    pg_server: RunningServer,
) -> None:
    # "$" in a pattern matches before a final newline: "alice\n" would have
    # been an account of its own, and a room or identity likewise.
    components = _components()
    status, problem = await _post(
        pg_server, {"action": "register", "account": "web-nl\n", "components": components}
    )
    assert status == 400
    assert set(problem["violations"]) == {"account.value"}
    status, problem = await _post(
        pg_server,
        {"action": "collaborate", "account": "web-nl", "room_id": "r\n", "components": components},
    )
    assert status == 400
    assert set(problem["violations"]) == {"room_id"}
    status, problem = await _post(
        pg_server, {"account": "web-nl", "identity": "0" * 32 + "\n"}, "/guard/logout"
    )
    assert status == 400
    assert set(problem["violations"]) == {"identity"}


async def test_demo_logout_frees_the_login_slot_that_grpc_counted(
    pg_server: RunningServer,
) -> None:
    guard = await guard_client(pg_server)
    service = pg_server.app.settings.guard_demo_service
    login = await guard.evaluate(service, "login", account("web-out"), fingerprint("out"), IP)
    assert login.verdict == pb.VERDICT_ALLOW
    body = {"account": "web-out", "identity": login.identity}
    assert await _post(pg_server, body, "/guard/logout") == (200, {"ended": True})
    assert await _post(pg_server, body, "/guard/logout") == (200, {"ended": False})
    assert not await guard.end_login(service, login.identity, account("web-out"))


async def test_demo_leave_frees_the_room_slot_that_grpc_counted(pg_server: RunningServer) -> None:
    guard = await guard_client(pg_server)
    service = pg_server.app.settings.guard_demo_service
    join = await guard.evaluate(
        service, "collaborate", account("web-in"), fingerprint("in"), IP, room_id="web-room"
    )
    assert join.verdict == pb.VERDICT_ALLOW
    body = {"account": "web-in", "identity": join.identity, "room_id": "web-room"}
    assert await _post(pg_server, body, "/guard/leave") == (200, {"left": True})
    assert not await guard.leave_room(service, "web-room", join.identity, account("web-in"))


async def test_demo_logout_and_leave_reject_bad_fields_with_every_field(
    pg_server: RunningServer,
) -> None:
    status, problem = await _post(pg_server, {"account": 7, "identity": 5}, "/guard/logout")
    assert status == 400
    assert set(problem["violations"]) == {"account", "identity"}
    # Content is the guard's to check, as for gRPC's EndLogin and LeaveRoom.
    status, problem = await _post(
        pg_server, {"account": "a", "identity": "not-an-identity"}, "/guard/logout"
    )
    assert status == 400
    assert set(problem["violations"]) == {"identity"}
    status, problem = await _post(pg_server, {"identity": "0" * 32}, "/guard/leave")
    assert status == 400
    assert set(problem["violations"]) == {"account", "room_id"}
    status, problem = await _post(pg_server, ["not", "an", "object"], "/guard/leave")
    assert status == 400


async def test_demo_endpoint_refuses_oversized_bodies(pg_server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{web_of(pg_server).url}/guard/evaluate",
            data=b"{" + b" " * 70_000 + b"}",
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        assert response.status == 413


async def test_demo_pages_and_collector_are_served(pg_server: RunningServer) -> None:
    base = web_of(pg_server).url
    async with aiohttp.ClientSession() as session:
        for path, release in (
            ("/", ""),
            ("/demo/register", ""),
            ("/demo/login", "/guard/logout"),
            ("/demo/collaborate", "/guard/leave"),
        ):
            async with session.get(base + path) as response:
                assert response.status == 200
                page = await response.text()
                assert "<form" in page or path == "/"
                assert ('id="release"' in page) == bool(release)
                assert release in page
        for path in ("/guard/static/collector.js", "/guard/static/fp.min.js"):
            async with session.get(base + path) as response:
                assert response.status == 200
        async with session.get(base + "/demo/nothing") as response:
            assert response.status == 404


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    proxies = parse_networks("10.0.0.0/8, ::1")
    assert client_ip("203.0.113.5", "198.51.100.1", proxies) == "203.0.113.5"
    assert client_ip("10.1.2.3", "198.51.100.1, 10.9.9.9", proxies) == "198.51.100.1"
    assert client_ip("10.1.2.3", "6.6.6.6, 198.51.100.1", proxies) == "198.51.100.1"
    assert client_ip("10.1.2.3", "", proxies) == "10.1.2.3"
    assert client_ip("10.1.2.3", "x", parse_networks("")) == "10.1.2.3"
