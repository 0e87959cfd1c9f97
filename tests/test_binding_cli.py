"""tether-partner and tether-device binding commands, run as a user runs them."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from pathlib import Path

from tests import binding_support as bs
from tests.support import RunningServer

BIN = Path(sys.executable).parent


async def run(server: RunningServer, token: str, tool: str, *args: str) -> tuple[int, str, str]:
    """Runs a CLI against the test server (without blocking the server's loop)."""
    env = {**os.environ, "TETHER_ADDRESS": server.address, "TETHER_TOKEN": token}
    process = await asyncio.create_subprocess_exec(
        str(BIN / tool),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def last_json(text: str) -> dict[str, object]:
    """The last JSON document a command printed."""
    start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
    value: dict[str, object] = json.loads(text[start:])
    return value


async def test_partner_imports_a_csv_exports_it_and_a_device_binds_from_it(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, partner_token = await pg_server.partner(services=("free-data", "music"))
    phones = [bs.phone() for _ in range(4000)]
    members = [f"m-{i}" for i in range(1000)]
    source = tmp_path / "accounts.csv"
    with source.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "value", "reference"])
        writer.writerows(["phone_number", p, f"crm-{i}"] for i, p in enumerate(phones))
        writer.writerows(["member_id", m] for m in members)
        writer.writerow(["phone_number", "not a number", "bad"])
        writer.writerow(["fax", "123", "bad"])

    code, out, err = await run(
        pg_server,
        partner_token,
        "tether-partner",
        "import",
        str(source),
        "--batch-size",
        "700",
        "--max-rejected",
        "2",
    )
    # Rows were rejected: the good ones are in, and the exit code says so.
    assert code == 1, err
    result = last_json(out)
    assert result["receivedCount"] == 5002
    assert result["rejectedCount"] == 2
    distinct = len(set(phones)) + len(members)
    assert result["importedCount"] == distinct
    assert "rows" in err  # the progress bar
    assert await bs.count_entries(pg_server, partner_id) == distinct

    exported = tmp_path / "export.csv"
    code, _, err = await run(pg_server, partner_token, "tether-partner", "export", str(exported))
    assert code == 0, err
    with exported.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == distinct
    assert {r["kind"] for r in rows} == {"phone_number", "member_id"}
    assert sum(r["partner_reference"].startswith("crm-") for r in rows) == len(set(phones))

    code, out, err = await run(pg_server, partner_token, "tether-partner", "services")
    assert code == 0, err
    assert '"serviceId": "free-data"' in out
    assert '"serviceId": "music"' in out

    device_token = await pg_server.credential("device")
    imei = bs.imei()
    code, out, err = await run(
        pg_server, device_token, "tether-device", "report", "--imei", imei, phones[7]
    )
    assert code == 0, err
    report = last_json(out)
    outcome = report["outcomes"][0]  # type: ignore[index]
    assert outcome["outcome"] == "REPORT_OUTCOME_BOUND"
    binding_id = outcome["binding"]["bindingId"]

    code, out, err = await run(pg_server, device_token, "tether-device", "bindings", "--imei", imei)
    assert code == 0, err
    assert binding_id in out
    code, out, err = await run(
        pg_server, partner_token, "tether-partner", "bindings", "--account", phones[7]
    )
    assert code == 0, err
    assert binding_id in out
    assert "crm-7" in out

    code, out, err = await run(
        pg_server, device_token, "tether-device", "unbind", "--imei", imei, binding_id
    )
    assert code == 0, err
    assert "BINDING_STATE_REVOKED" in out
    assert await bs.count_bindings(pg_server, partner_id) == 0


async def test_partner_adds_and_removes_accounts_from_the_command_line(
    pg_server: RunningServer,
) -> None:
    partner_id, partner_token = await pg_server.partner()
    code, out, err = await run(
        pg_server, partner_token, "tether-partner", "add", "--kind", "member_id", "a-1", "a-2"
    )
    assert code == 0, err
    assert last_json(out)["addedCount"] == 2
    code, out, err = await run(
        pg_server, partner_token, "tether-partner", "remove", "--kind", "member_id", "a-1"
    )
    assert code == 0, err
    assert "removed 1" in out
    assert await bs.count_entries(pg_server, partner_id) == 1


async def test_device_report_with_a_bad_imei_fails_with_the_reason(
    pg_server: RunningServer,
) -> None:
    device_token = await pg_server.credential("device")
    code, _, err = await run(
        pg_server,
        device_token,
        "tether-device",
        "report",
        "--imei",
        "490154203237519",
        "+4915112345678",
    )
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "ERROR_REASON_INVALID_FIELD" in err
    assert "device.terminal_id" in err
