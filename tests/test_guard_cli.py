"""tether-internal guard commands against a running server."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path

from google.protobuf import json_format

from tests.guard_support import fingerprint, guard_client
from tests.support import RunningServer

CLI = str(Path(sys.executable).parent / "tether-internal")


async def _run(server: RunningServer, token: str, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        CLI,
        "--address",
        server.address,
        "--token",
        token,
        "guard",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_cli_sets_policies_evaluates_and_looks_up(pg_server: RunningServer) -> None:
    token = await pg_server.credential("internal")
    service = f"cli-{secrets.token_hex(4)}"
    code, out = await _run(pg_server, token, "policy", "set", service, "--register-limit", "1")
    assert code == 0, out
    code, out = await _run(pg_server, token, "policy", "set", service, "--mode", "shadow")
    assert code == 0, out
    code, out = await _run(pg_server, token, "policy", "get", service)
    policy = json.loads(out)
    assert (policy["registerLimit"], policy["mode"]) == (1, "MODE_SHADOW")
    await _run(pg_server, token, "policy", "set", service, "--mode", "enforce")

    components = json.dumps(
        json_format.MessageToDict(fingerprint("cli"), preserving_proto_field_name=True)
    )
    args = ("evaluate", service, "register", "--components", components, "--ip", "192.0.2.8")
    code, out = await _run(pg_server, token, *args[:3], "first", *args[3:])
    assert code == 0, out
    identity = json.loads(out)["identity"]
    code, out = await _run(pg_server, token, *args[:3], "second", *args[3:])
    assert code == 3, out
    assert json.loads(out)["verdict"] == "VERDICT_DENY"

    code, out = await _run(pg_server, token, "rebuild", "--service", service)
    assert (code, json.loads(out)) == (0, {"entriesRestored": 0})
    code, out = await _run(pg_server, token, "identity-accounts", identity)
    assert code == 0
    assert service in out
    code, out = await _run(pg_server, token, "account-identities", "first")
    assert identity in out
    guard = await guard_client(pg_server)
    assert (await guard.get_policy(service)).register_limit == 1


async def test_cli_reports_bad_input_with_reason(pg_server: RunningServer) -> None:
    token = await pg_server.credential("internal")
    code, out = await _run(pg_server, token, "policy", "get", "no-such-service")
    assert code == 1
    assert "ERROR_REASON_GUARD_SERVICE_NOT_FOUND" in out
