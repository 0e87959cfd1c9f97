"""The provisioning walk-through, run with the command-line tools as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from tests import binding_support as bs
from tests.support import RunningServer
from tests.test_binding_cli import BIN, last_json, run


def _documents(text: str) -> list[dict[str, str]]:
    """The JSON documents a command printed one after another."""
    decoder = json.JSONDecoder()
    found, index = [], 0
    while (start := text.find("{", index)) != -1:
        value, index = decoder.raw_decode(text, start)
        found.append(value)
    return found


async def _start(
    server: RunningServer, token: str, tool: str, *args: str
) -> asyncio.subprocess.Process:
    env = {**os.environ, "TETHER_ADDRESS": server.address, "TETHER_TOKEN": token}
    return await asyncio.create_subprocess_exec(
        str(BIN / tool),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_walk_through_demo_partner_opens_and_device_sees_checks_and_asks_usage(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner(services=("free-data",))
    device_token = await pg_server.credential("device")
    internal_token = await pg_server.credential("internal")
    phone, imei, other_imei = bs.phone(), bs.imei(), bs.imei()
    await bs.add_accounts(pg_server, partner_token, [bs.phone_account(phone)], "cust-42")

    partner = await _start(pg_server, partner_token, "tether-partner", "serve", "--delay", "0.1")
    assert partner.stdout is not None
    connected = await asyncio.wait_for(partner.stdout.readline(), 30)
    assert b"demo partner connected" in connected
    watch = await _start(
        pg_server, device_token, "tether-device", "watch", "--imei", imei, "--count", "2"
    )
    try:
        code, out, err = await run(
            pg_server, device_token, "tether-device", "report", "--imei", imei, phone
        )
        assert code == 0, err
        binding_id = str(last_json(out)["outcomes"][0]["binding"]["bindingId"])  # type: ignore[index]

        watched, _ = await asyncio.wait_for(watch.communicate(), 30)
        assert watch.returncode == 0
        states = [event["state"] for event in _documents(watched.decode())]
        assert states == ["ENTITLEMENT_STATE_ACTIVATING", "ENTITLEMENT_STATE_ACTIVE"]

        check = (phone, "--partner", partner_id, "--service", "free-data")
        code, out, _ = await run(
            pg_server, device_token, "tether-device", "check", "--imei", imei, *check
        )
        assert code == 0 and last_json(out)["entitled"] is True
        code, out, _ = await run(
            pg_server, device_token, "tether-device", "check", "--imei", other_imei, *check
        )
        assert code == 3 and last_json(out)["entitled"] is False

        usage = ("usage", "--imei", imei, "--binding", binding_id, "--service", "free-data")
        code, out, err = await run(pg_server, device_token, "tether-device", *usage)
        assert code == 0, err
        assert last_json(out)["source"] == "USAGE_ANSWER_SOURCE_PARTNER"
    finally:
        partner.send_signal(signal.SIGINT)
        await asyncio.wait_for(partner.communicate(), 30)
    assert partner.returncode == 0

    code, out, err = await run(pg_server, device_token, "tether-device", *usage)
    assert last_json(out)["source"] == "USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NOT_CONNECTED"
    code, out, err = await run(
        pg_server, internal_token, "tether-internal", "pipeline", "--partner", partner_id
    )
    assert code == 0, err
    stages = last_json(out)["stages"]
    assert isinstance(stages, list)
    assert [s["state"] for s in stages] == ["INSTRUCTION_STATE_CONFIRMED"]
    code, _, err = await run(
        pg_server,
        internal_token,
        "tether-internal",
        "replay",
        "5b7f3f0e-9f0a-4a57-8d5c-5d6e4f1a2b3c",
    )
    assert code == 1 and "ERROR_REASON_INSTRUCTION_NOT_FOUND" in err
