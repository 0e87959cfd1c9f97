"""Errors a person can act on: each command-line mistake ends in one line
saying what is wrong and how to fix it, with the exit code, never a traceback;
and bad input writes nothing. Run as a user runs the tools, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import pty
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import binding_support as bs
from tests.conftest import create_database, drop_database
from tests.guard_support import guard_client, new_service
from tests.support import RunningServer, expect_error, free_port, start_server
from tests.test_binding_cli import BIN
from tether.clients.guard.client import backtest_event
from tether.guard.v1 import messages_pb2 as gpb
from tether.server.shared import digests
from tether.server.storage import migrate

KINDS = "phone_number, member_id, email, social_id, login_id"


async def run(
    server: RunningServer | None,
    token: str,
    tool: str,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: int | None = None,
) -> tuple[int, str, str]:
    """Runs a CLI; stdin is /dev/null unless given (a pipe, never a terminal)."""
    environment = {**os.environ, "TETHER_TOKEN": token, **(env or {})}
    if server is not None:
        environment["TETHER_ADDRESS"] = server.address
    process = await asyncio.create_subprocess_exec(
        str(BIN / tool),
        *args,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def only_line(err: str) -> str:
    """The one line a failed command printed (no traceback, no progress bar)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- files named on the command line --------------------------------------------------


async def test_missing_token_file_says_which_file_and_how_to_fix_it(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    missing = tmp_path / "partner.token"
    code, _, err = await run(
        pg_server, "", "tether-partner", "--token-file", str(missing), "services"
    )
    assert code == 2
    assert only_line(err) == (
        f"error: --token-file {missing}: no such file; give the file that holds your token"
        " (tether-admin create-credential --token-only)"
    )


@pytest.mark.parametrize(
    "held",
    ["cred_abc\x01def", "cred_abc def", "caf\u00e9", "a" * 5000],
    ids=["control character", "blank", "not ASCII", "too long"],
)
async def test_a_token_file_holding_no_token_says_so_before_any_call(
    held: str, tmp_path: Path
) -> None:
    # No server: the token is refused before the tool connects.
    path = tmp_path / "internal.token"
    path.write_text(held, encoding="utf-8")
    code, _, err = await run(
        None, "", "tether-internal", "--token-file", str(path), "guard", "policy", "get", "shop"
    )
    assert code == 2
    assert only_line(err) == (
        f"error: --token-file {path}: not a token (a token is one word of visible ASCII"
        " characters); give the token tether-admin create-credential --token-only printed"
    )


async def test_missing_csv_says_so_and_nothing_is_sent(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    missing = tmp_path / "accounts.csv"
    code, _, err = await run(pg_server, token, "tether-partner", "import", str(missing))
    assert code == 2
    assert only_line(err) == f"error: {missing}: no such file; give the CSV to import"
    assert await bs.count_entries(pg_server, partner_id) == 0


async def test_missing_components_file_says_so(pg_server: RunningServer, tmp_path: Path) -> None:
    token = await pg_server.credential("internal")
    missing = tmp_path / "fp.json"
    code, _, err = await run(
        pg_server,
        token,
        "tether-internal",
        "guard",
        "evaluate",
        "shop",
        "register",
        "alice",
        "--components",
        f"@{missing}",
        "--ip",
        "192.0.2.1",
    )
    assert code == 2
    assert only_line(err) == (
        f"error: --components {missing}: no such file; give the components collector.js sent,"
        " as a JSON object of proto field names"
    )


async def test_malformed_json_in_a_components_file_says_where(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    token = await pg_server.credential("internal")
    bad = tmp_path / "fp.json"
    bad.write_text('{"browser_name": "Firefox",\n "os_name": }\n')
    code, _, err = await run(
        pg_server,
        token,
        "tether-internal",
        "guard",
        "evaluate",
        "shop",
        "register",
        "alice",
        "--components",
        f"@{bad}",
        "--ip",
        "192.0.2.1",
    )
    assert code == 2
    assert only_line(err) == (
        f"error: --components @{bad}: not valid JSON (Expecting value at line 2 column 13);"
        " give the components collector.js sent, as a JSON object of proto field names"
    )


async def test_connection_refused_names_the_address_and_the_setting() -> None:
    address = f"127.0.0.1:{free_port()}"
    code, _, err = await run(
        None, "some-token", "tether-admin", "partners", env={"TETHER_ADDRESS": address}
    )
    assert code == 1
    assert only_line(err) == (
        f"error: cannot reach Tether at {address} (connection refused); start the server,"
        " or point --address or TETHER_ADDRESS at it"
    )


# --- imports ------------------------------------------------------------------------


async def test_any_bad_row_fails_the_import_naming_rows_by_line_and_writes_nothing(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    source = write_csv(
        tmp_path / "a.csv",
        "kind,value,reference\n"
        f"phone_number,{bs.phone()},ok\n"
        "\n"
        "fax,123,bad\n"
        f"member_id,m-{os.urandom(3).hex()},ok\n"
        "phone_number,not a number,bad\n",
    )
    code, out, err = await run(
        pg_server, token, "tether-partner", "import", str(source), "--no-progress"
    )
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"{source}:4: kind: unknown account kind 'fax'; use one of {KINDS}",
        f"{source}:6: value: not a phone number; use E.164 (+4915112345678) or give --region",
        f"error: {source}: rows rejected (fix those rows, or pass --max-rejected N to import"
        " the others); nothing was imported",
    ]
    assert await bs.count_entries(pg_server, partner_id) == 0


async def test_max_rejected_tolerates_that_many_and_exits_non_zero(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    good = [f"member_id,m-{i}-{os.urandom(3).hex()}\n" for i in range(3)]
    source = write_csv(tmp_path / "a.csv", "".join(good) + "fax,1\nfax,2\n")
    args = ("import", str(source), "--no-progress", "--max-rejected")
    code, _, err = await run(pg_server, token, "tether-partner", *args, "1")
    assert code == 1
    assert err.splitlines()[-1] == (
        f"error: {source}: rows rejected (more than --max-rejected 1); nothing was imported"
    )
    assert await bs.count_entries(pg_server, partner_id) == 0

    code, out, err = await run(pg_server, token, "tether-partner", *args, "2")
    assert code == 1
    result = json.loads(out)
    assert (result["importedCount"], result["rejectedCount"]) == (3, 2)
    assert [r["line"] for r in result["rejected"]] == [4, 5]
    assert err.splitlines()[-1] == (
        f"error: {source}: 2 rows were rejected (within --max-rejected 2); the other rows were"
        " imported"
    )
    assert await bs.count_entries(pg_server, partner_id) == 3


async def test_a_field_over_the_csv_limit_is_a_rejected_row(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    source = write_csv(
        tmp_path / "a.csv",
        f'member_id,m-1\nmember_id,"{"x" * 131_073}"\nmember_id,m-3\n',
    )
    code, _, err = await run(
        pg_server, token, "tether-partner", "import", str(source), "--no-progress"
    )
    assert code == 1
    assert err.splitlines() == [
        f"{source}:2: a field longer than 131,072 characters",
        f"error: {source}: rows rejected (fix those rows, or pass --max-rejected N to import"
        " the others); nothing was imported",
    ]
    assert await bs.count_entries(pg_server, partner_id) == 0

    code, out, _ = await run(
        pg_server, token, "tether-partner", "import", str(source), "--max-rejected", "1"
    )
    assert code == 1
    assert json.loads(out)["importedCount"] == 2


async def test_a_utf8_bom_is_accepted(pg_server: RunningServer, tmp_path: Path) -> None:
    partner_id, token = await pg_server.partner()
    source = tmp_path / "excel.csv"
    source.write_bytes(b"\xef\xbb\xbfkind,value,reference\r\nmember_id,m-1,crm-1\r\n")
    code, out, err = await run(pg_server, token, "tether-partner", "import", str(source))
    assert code == 0, err
    assert json.loads(out)["importedCount"] == 1
    assert await bs.count_entries(pg_server, partner_id) == 1


async def test_unknown_columns_are_an_error_unless_ignored(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    source = write_csv(tmp_path / "a.csv", "kind,value,reference,notes\nmember_id,m-1,r,hi\n")
    code, _, err = await run(pg_server, token, "tether-partner", "import", str(source))
    assert code == 2
    assert only_line(err) == (
        f"error: {source}:1: unknown column 'notes'; the columns are kind, value and reference"
        " (--ignore-extra-columns skips others)"
    )
    assert await bs.count_entries(pg_server, partner_id) == 0

    code, out, err = await run(
        pg_server, token, "tether-partner", "import", str(source), "--ignore-extra-columns"
    )
    assert code == 0, err
    assert json.loads(out)["importedCount"] == 1


async def test_import_with_another_partner_fails_before_the_upload_naming_the_flag(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    source = write_csv(tmp_path / "a.csv", "member_id,m-1\n")
    code, _, err = await run(
        pg_server, token, "tether-partner", "import", str(source), "--partner", "p-other"
    )
    assert code == 1
    # One line: the progress bar never started.
    assert only_line(err) == (
        "error: partner 'p-other' not found; check --partner"
        " [NOT_FOUND ERROR_REASON_PARTNER_NOT_FOUND]"
    )
    assert await bs.count_entries(pg_server, partner_id) == 0


async def test_import_without_partner_for_an_admin_names_the_flag(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "a.csv", "member_id,m-1\n")
    code, _, err = await run(
        pg_server, pg_server.admin_token, "tether-partner", "import", str(source)
    )
    assert code == 1
    assert only_line(err) == (
        "error: invalid request: --partner: required [INVALID_ARGUMENT ERROR_REASON_INVALID_FIELD]"
    )


async def test_replace_with_an_empty_file_needs_yes(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    await bs.add_accounts(pg_server, token, [bs.member()])
    empty = write_csv(tmp_path / "empty.csv", "kind,value\n")
    code, _, err = await run(pg_server, token, "tether-partner", "import", str(empty), "--replace")
    assert code == 2
    assert only_line(err) == (
        f"error: {empty} has no rows: --replace would empty the whole list; pass --yes to do that"
    )
    assert await bs.count_entries(pg_server, partner_id) == 1

    code, out, err = await run(
        pg_server, token, "tether-partner", "import", str(empty), "--replace", "--yes"
    )
    assert code == 0, err
    assert json.loads(out)["removedCount"] == 1
    assert await bs.count_entries(pg_server, partner_id) == 0


async def test_replace_with_an_empty_file_asks_on_a_terminal(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    await bs.add_accounts(pg_server, token, [bs.member()])
    empty = write_csv(tmp_path / "empty.csv", "")
    terminal, answer = pty.openpty()
    try:
        os.write(terminal, b"n\n")
        code, out, err = await run(
            pg_server,
            token,
            "tether-partner",
            "import",
            str(empty),
            "--replace",
            stdin=answer,
        )
    finally:
        os.close(terminal)
        os.close(answer)
    assert out == f"{empty} has no rows: empty the whole list? [y/N] "
    assert (code, only_line(err)) == (1, "error: nothing changed")
    assert await bs.count_entries(pg_server, partner_id) == 1


# --- messages in the caller's terms ---------------------------------------------------


async def test_evaluate_lists_every_violation_saying_what_is_wrong_with_each_value(
    pg_server: RunningServer,
) -> None:
    token = await pg_server.credential("internal")
    code, _, err = await run(
        pg_server,
        token,
        "tether-internal",
        "guard",
        "evaluate",
        "shop",
        "collaborate",
        "alice",
        "--components",
        "{}",
        "--ip",
        "999.1.1.1",
        "--room",
        "bad room!",
    )
    assert code == 1
    assert only_line(err) == (
        "error: invalid request: --room: 'bad room!' is not a room id: 1-128 characters of"
        " A-Z, a-z, 0-9 and . _ : -; components.browser_name: required;"
        " components.browser_version: required; components.os_name: required;"
        " components.screen_width: required: 1-100000 CSS pixels;"
        " components.screen_height: required: 1-100000 CSS pixels;"
        " components.languages: required: at least one BCP 47 tag;"
        " --ip: '999.1.1.1' is not an IP address (IPv4 or IPv6)"
        " [INVALID_ARGUMENT ERROR_REASON_INVALID_FIELD]"
    )


async def test_evaluate_status_message_counts_the_violations_it_does_not_list(
    pg_server: RunningServer,
) -> None:
    client = await guard_client(pg_server)
    detail = await expect_error(
        client.stub.Evaluate(
            gpb.EvaluateRequest(
                service_id="shop",
                action=gpb.ACTION_COLLABORATE,
                account=bs.member(),
                client_ip="999.1.1.1",
                room_id="bad room!",
                components=gpb.FingerprintComponents(),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert len(detail.violations) == 8
    assert detail.message.endswith("; and 3 more")


async def test_a_national_phone_number_error_names_the_region_flag(
    pg_server: RunningServer,
) -> None:
    token = await pg_server.credential("device")
    code, _, err = await run(
        pg_server, token, "tether-device", "report", "--imei", bs.imei(), "015112345678"
    )
    assert code == 1
    assert only_line(err) == (
        "error: invalid request: account.value: not a phone number; use E.164 (+4915112345678)"
        " or give --region [INVALID_ARGUMENT ERROR_REASON_INVALID_FIELD]"
    )


# --- watch --------------------------------------------------------------------------


async def _server_on(
    port: int, database_url: str, redis_url: str, data_dir: Path, keys: str
) -> RunningServer:
    return await start_server(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=data_dir,
        listen=f"127.0.0.1:{port}",
        digest_keys=keys,
    )


async def test_watch_says_the_stream_ended_and_resumes_after_its_position(
    redis_url: str, tmp_path: Path
) -> None:
    name, database_url = await create_database()
    port, keys = free_port(), digests.new_key_spec("test")
    server = await _server_on(port, database_url, redis_url, tmp_path, keys)
    watch: asyncio.subprocess.Process | None = None
    try:
        _, partner_token = await server.partner(services=("free-data",))
        device_token = await server.credential("device")
        first, second, imei = bs.phone(), bs.phone(), bs.imei()
        await bs.add_accounts(server, partner_token, [bs.phone_account(first)])
        await bs.add_accounts(server, partner_token, [bs.phone_account(second)])
        watch = await asyncio.create_subprocess_exec(
            str(BIN / "tether-device"),
            "watch",
            "--imei",
            imei,
            "--count",
            "2",
            env={**os.environ, "TETHER_ADDRESS": server.address, "TETHER_TOKEN": device_token},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert watch.stdout is not None and watch.stderr is not None
        code, _, err = await run(
            server, device_token, "tether-device", "report", "--imei", imei, first
        )
        assert code == 0, err
        assert (await asyncio.wait_for(watch.stdout.readline(), 30)).strip() == b"{"

        await server.stop()
        ended = (await asyncio.wait_for(watch.stderr.readline(), 30)).decode()
        assert ended.startswith("watch: the ")
        assert ended.endswith("; reconnecting in 0.5s to resume after position 1\n")

        server = await _server_on(port, database_url, redis_url, tmp_path, keys)
        code, _, err = await run(
            server, device_token, "tether-device", "report", "--imei", imei, second
        )
        assert code == 0, err
        out, _ = await asyncio.wait_for(watch.communicate(), 60)
        assert watch.returncode == 0
        positions = [json.loads("{" + doc)["position"] for doc in out.decode().split("\n{")[1:]]
        # The first event is not sent again: the watch resumed after it.
        assert positions == [2]
    finally:
        if watch is not None and watch.returncode is None:
            watch.kill()
            await watch.wait()
        await server.stop()
        await drop_database(name)


async def test_watch_once_stops_when_the_stream_ends(redis_url: str, tmp_path: Path) -> None:
    name, database_url = await create_database()
    server = await _server_on(
        free_port(), database_url, redis_url, tmp_path, digests.new_key_spec("test")
    )
    try:
        device_token = await server.credential("device")
        watch = await asyncio.create_subprocess_exec(
            str(BIN / "tether-device"),
            "watch",
            "--imei",
            bs.imei(),
            "--once",
            env={**os.environ, "TETHER_ADDRESS": server.address, "TETHER_TOKEN": device_token},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(2)  # the stream is open
    finally:
        await server.stop()
        await drop_database(name)
    _, err = await asyncio.wait_for(watch.communicate(), 30)
    assert only_line(err.decode()).startswith("watch: the ")
    assert err.decode().strip().endswith("; stopping (--once)")


# --- output ---------------------------------------------------------------------------


async def test_one_usage_event_is_singular(pg_server: RunningServer) -> None:
    _, partner_token = await pg_server.partner(services=("free-data",))
    device_token = await pg_server.credential("device")
    phone, imei = bs.phone(), bs.imei()
    await bs.add_accounts(pg_server, partner_token, [bs.phone_account(phone)])
    code, out, err = await run(
        pg_server, device_token, "tether-device", "report", "--imei", imei, phone
    )
    assert code == 0, err
    binding_id = json.loads(out)["outcomes"][0]["binding"]["bindingId"]
    code, out, err = await run(
        pg_server,
        device_token,
        "tether-device",
        "report-usage",
        "--imei",
        imei,
        "--binding",
        binding_id,
        "--service",
        "free-data",
        "data_mb=30",
    )
    assert code == 0, err
    assert out == "recorded 1 usage event\n"


async def test_migrate_says_what_it_applied(tmp_path: Path) -> None:
    env = {**os.environ, "TETHER_DATA_DIR": str(tmp_path), "TETHER_DATABASE_URL": ""}
    outputs = []
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            str(BIN / "tether-server"),
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err
        outputs.append(out.decode())
    head = migrate.head_revision()
    assert outputs[0].startswith("applied ")
    assert outputs[0].splitlines()[1] == "  0001: partners, services, credentials, idempotency"
    assert outputs[0].splitlines()[-1].startswith(f"  {head}: ")
    assert outputs[1] == f"nothing to apply: the database is at {head}\n"


async def test_pipeline_list_without_partner_says_so_before_any_call(
    pg_server: RunningServer,
) -> None:
    token = await pg_server.credential("internal")
    code, out, err = await run(pg_server, token, "tether-internal", "pipeline", "--list", "dead")
    assert (code, out) == (2, "")
    assert only_line(err) == (
        "error: --list needs --partner: name the partner whose instructions to list"
    )


async def test_watch_once_against_no_server_names_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    code, _, err = await run(
        None,
        "some-token",
        "tether-device",
        "watch",
        "--imei",
        bs.imei(),
        "--once",
        env={"TETHER_ADDRESS": address},
    )
    assert code == 1
    assert only_line(err) == (
        f"watch: cannot reach Tether at {address} (TETHER_ADDRESS); stopping (--once)"
    )


async def test_a_usage_figure_without_a_number_says_how_to_write_it(
    pg_server: RunningServer,
) -> None:
    token = await pg_server.credential("device")
    code, _, err = await run(
        pg_server,
        token,
        "tether-device",
        "report-usage",
        "--imei",
        bs.imei(),
        "--binding",
        "b",
        "--service",
        "s",
        "data_mb=lots",
    )
    assert code == 2
    assert only_line(err) == (
        "error: 'data_mb=lots': give metric=quantity, a whole number up to"
        " 9,223,372,036,854,775,807, e.g. data_mb=30"
    )


async def test_an_unknown_component_field_is_named_in_one_line(pg_server: RunningServer) -> None:
    token = await pg_server.credential("internal")
    code, _, err = await run(
        pg_server,
        token,
        "tether-internal",
        "guard",
        "evaluate",
        "shop",
        "register",
        "alice",
        "--components",
        '{"browser_nam": "Firefox"}',
        "--ip",
        "192.0.2.1",
    )
    assert code == 2
    assert only_line(err) == (
        'error: --components: Message type "tether.guard.v1.FingerprintComponents" has no field'
        ' named "browser_nam" at "FingerprintComponents"; give the components collector.js sent,'
        " as a JSON object of proto field names"
    )


async def test_create_admin_before_migrate_says_to_migrate_then_issues_a_token(
    tmp_path: Path,
) -> None:
    data = tmp_path / "fresh"  # does not exist yet, as on a fresh clone
    env = {**os.environ, "TETHER_DATA_DIR": str(data), "TETHER_DATABASE_URL": ""}

    async def server_command(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            str(BIN / "tether-server"),
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await server_command("create-admin")
    assert (code, out) == (1, "")
    assert err == (
        "tether-server create-admin: the database is not ready (no such table: credentials); "
        "run `tether-server migrate` first\n"
    )
    assert (await server_command("migrate"))[0] == 0
    code, out, err = await server_command("create-admin")
    assert code == 0, err
    assert out.startswith("cred_") and len(out.splitlines()) == 1


async def _internal_and_service(server: RunningServer) -> tuple[str, str]:
    """An internal credential, and a new guard service of limit 2 to backtest."""
    token = await server.credential("internal")
    service = await new_service(await guard_client(server), register_limit=2)
    return token, service


async def test_backtest_of_a_missing_or_malformed_events_file_says_which_line(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    token, service = await _internal_and_service(pg_server)
    fix = "give JSON lines of events (see tether-internal guard backtest --help)"
    missing = tmp_path / "events.jsonl"
    code, out, err = await run(
        pg_server, token, "tether-internal", "guard", "backtest", str(missing), "--policy", service
    )
    assert (code, out) == (2, "")
    assert only_line(err) == f"error: {missing}: no such file; {fix}"

    good = {
        "service_id": service,
        "account": "bt1",
        "components": {"browser_name": "Chrome", "languages": ["en-US"]},
        "client_ip": "192.0.2.9",
        "event_time": 1_700_000_000,
    }
    events = tmp_path / "bad.jsonl"
    events.write_text(json.dumps(good) + "\n" + '{"account": "bt2", "event_time": }\n')
    code, out, err = await run(
        pg_server, token, "tether-internal", "guard", "backtest", str(events), "--policy", service
    )
    assert (code, out) == (2, "")
    assert only_line(err).startswith(f"error: {events}:2: Expecting value")
    assert only_line(err).endswith(f"; {fix}")


# Lines a backtest's events file may hold by mistake, and what is said of each.
BAD_EVENT_LINES = {
    "[1, 2]": "an event is a JSON object, not an array",
    "null": "an event is a JSON object, not null",
    '{"event_time": 1e400}': "event_time: inf is not a time",
    '{"event_time": true}': "event_time: Unix seconds or an RFC 3339 time, not true or false",
    '{"event_time": 1, "action": "signup"}': (
        "action: 'signup' is not one of 'register', 'login', 'collaborate'"
    ),
    '{"event_time": 1, "account": {"kind": ["email"]}}': (
        f"account.kind: ['email'] is not one of {KINDS}"
    ),
    '{"event_time": 1, "components": "Chrome"}': (
        "components: a JSON object of proto field names, not a string"
    ),
    '{"event_time": 1, "components": {"fonts": [1, 2]}}': "components: Failed to parse fonts",
    "[" * 100_000: "nested too deeply",
}


@pytest.mark.parametrize("line", list(BAD_EVENT_LINES), ids=lambda line: line[:40])
async def test_a_backtest_line_that_is_no_event_says_which_line_and_what_is_wrong(
    line: str, pg_server: RunningServer, tmp_path: Path
) -> None:
    token, service = await _internal_and_service(pg_server)
    events = tmp_path / "events.jsonl"
    good = {"service_id": service, "account": "bt1", "event_time": 1_700_000_000}
    events.write_text(json.dumps(good) + "\n" + line + "\n")
    code, out, err = await run(
        pg_server, token, "tether-internal", "guard", "backtest", str(events), "--policy", service
    )
    assert (code, out) == (2, "")
    said = only_line(err)
    assert said.startswith(f"error: {events}:2: {BAD_EVENT_LINES[line]}"), said
    assert said.endswith("; give JSON lines of events (see tether-internal guard backtest --help)")


async def test_components_nested_too_deeply_say_so(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    token = await pg_server.credential("internal")
    path = tmp_path / "fp.json"
    path.write_text("[" * 100_000)
    code, _, err = await run(
        pg_server, token, "tether-internal", "guard", "evaluate", "shop", "register", "alice",
        "--components", f"@{path}", "--ip", "192.0.2.1",
    )  # fmt: skip
    assert code == 2
    assert only_line(err) == (
        f"error: --components @{path}: not valid JSON (nested too deeply); give the components"
        " collector.js sent, as a JSON object of proto field names"
    )


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["register", "login", "email", "legitimate", "2024-01-01T00:00:00Z"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["kind", "value", "fonts", "screen_width", "extra", "pixel_ratio", "x"]
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
_EVENT_FIELDS = ["service_id", "action", "account", "components", "client_ip", "room_id",
                 "event_time", "label", "actor", "strategy"]  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(st.one_of(_JSON, st.dictionaries(st.sampled_from(_EVENT_FIELDS), _JSON, max_size=6)))
def test_any_json_record_is_an_event_or_a_value_error(record: object) -> None:
    """What the events file's lines hold becomes an event or a ValueError the
    CLI reports as the line's problem: never another exception, which inside
    the request stream would only cancel the call."""
    try:
        event = backtest_event(record)
    except ValueError as error:
        assert str(error)
    else:
        assert event.HasField("event_time")


# --- numbers, output and files the tools write ----------------------------------------


@pytest.mark.parametrize(
    ("tool", "args", "said"),
    [
        (
            "tether-internal",
            ["guard", "policy", "set", "shop", "--register-limit", "99999999999999999999"],
            "argument --register-limit: '99999999999999999999' is not a whole number"
            " from 0 to 2,147,483,647",
        ),
        (
            "tether-internal",
            ["guard", "policy", "set", "shop", "--login-limit", "\u0661\u0662"],
            "argument --login-limit: '\u0661\u0662' is not a whole number from 0 to 2,147,483,647",
        ),
        (
            "tether-device",
            ["usage", "--imei", "490154203237518", "--binding", "b", "--service", "s",
             "--timeout", "nan"],
            "argument --timeout: 'nan' is not a number of seconds, more than 0",
        ),
        (
            "tether-internal",
            ["usage", "--until", "0001-01-01"],
            "argument --until: '0001-01-01' is not a day: YYYY-MM-DD,"
            " from 0002-01-01 to 9998-12-31",
        ),
    ],
    ids=["beyond int32", "not ASCII digits", "nan seconds", "a day with no month before it"],
)  # fmt: skip
async def test_a_number_or_day_no_field_can_hold_is_a_usage_error_naming_the_flag(
    tool: str, args: list[str], said: str
) -> None:
    code, _, err = await run(None, "cred_unused", tool, *args)
    assert code == 2
    assert err.strip().splitlines()[-1].endswith(f"error: {said}"), err
    assert "Traceback" not in err


async def _credentials_into(server: RunningServer, stdout: int) -> tuple[int | None, bytes]:
    """tether-admin credentials with its output into a file descriptor."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "tether-admin"), "credentials",
        env={**os.environ, "TETHER_TOKEN": server.admin_token, "TETHER_ADDRESS": server.address},
        stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, err


async def test_output_to_a_reader_that_left_or_a_full_disk_is_one_line_or_none(
    pg_server: RunningServer,
) -> None:
    # A reader that left (`| head -c1`): the command stops quietly.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        assert await _credentials_into(pg_server, write_end) == (0, b"")
    finally:
        os.close(write_end)
    # A full disk: one line.
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        code, err = await _credentials_into(pg_server, full)
    finally:
        os.close(full)
    assert code == 1
    assert only_line(err.decode()) == (
        "error: input/output failed (No space left on device); check the disk and the files"
        " the command reads and writes"
    )


async def test_an_import_from_a_pipe_imports_every_row_with_the_progress_bar_on(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    partner_id, token = await pg_server.partner()
    rows = 3000
    csv = tmp_path / "accounts.csv"
    csv.write_text("kind,value\n" + "".join(f"member_id,piped-{i}\n" for i in range(rows)))
    # The bar's total was counted by reading the file again: a pipe gave
    # its rows to the count, and the import saw only what was left.
    process = await asyncio.create_subprocess_shell(
        f"cat {csv} | {BIN / 'tether-partner'} import /dev/stdin",
        env={**os.environ, "TETHER_TOKEN": token, "TETHER_ADDRESS": pg_server.address},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err
    assert json.loads(out)["importedCount"] == rows
    assert await bs.count_entries(pg_server, partner_id) == rows


async def test_a_refused_export_leaves_the_file_as_it_was(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    out = tmp_path / "entries.csv"
    out.write_text("what was there\n")
    code, _, err = await run(pg_server, "cred_nobody", "tether-partner", "export", str(out))
    assert code == 1
    assert "UNAUTHENTICATED" in only_line(err)
    assert out.read_text() == "what was there\n"
    assert [path.name for path in os.scandir(tmp_path)] == [out.name]


async def test_backtest_verdicts_never_overwrite_the_events_and_a_policy_file_is_an_object(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    token, service = await _internal_and_service(pg_server)
    events = tmp_path / "events.jsonl"
    line = json.dumps({"service_id": service, "account": "v1", "event_time": 1_700_000_000})
    events.write_text(line + "\n")
    code, _, err = await run(
        pg_server, token, "tether-internal", "guard", "backtest", str(events),
        "--policy", service, "--verdicts", str(events),
    )  # fmt: skip
    assert code == 2
    assert only_line(err) == (
        f"error: --verdicts {str(events)!r}: give a file of its own for the verdicts (not the"
        " events file, which it would empty)"
    )
    assert events.read_text() == line + "\n"
    policy = tmp_path / "policy.json"
    policy.write_text("[]")
    code, _, err = await run(
        pg_server, token, "tether-internal", "guard", "backtest", str(events),
        "--policy", f"@{policy}",
    )  # fmt: skip
    assert code == 2
    assert only_line(err).startswith(f"error: --policy {policy}: not a JSON object")


@pytest.mark.parametrize("address", ["::::", "host:notaport", "http://127.0.0.1:50051", "h:70000"])
async def test_an_address_that_is_no_host_and_port_says_so_not_that_the_server_is_down(
    address: str,
) -> None:
    code, _, err = await run(None, "cred_unused", "tether-admin", "--address", address, "partners")
    assert code == 2
    assert only_line(err).startswith(f"error: --address {address!r}: not host:port")


async def test_an_import_reads_standard_input_given_as_a_dash(pg_server: RunningServer) -> None:
    partner_id, token = await pg_server.partner()

    async def import_stdin(text: str, *args: str) -> tuple[int | None, bytes, bytes]:
        process = await asyncio.create_subprocess_exec(
            str(BIN / "tether-partner"), "import", "-", *args,
            env={**os.environ, "TETHER_TOKEN": token, "TETHER_ADDRESS": pg_server.address},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(text.encode()), 60)
        return process.returncode, out, err

    code, out, err = await import_stdin("kind,value\nmember_id,dash-1\nmember_id,dash-2\n")
    assert code == 0, err
    assert json.loads(out)["importedCount"] == 2
    # No rows and --replace: there is no one to ask, so --yes is needed.
    code, _, err = await import_stdin("kind,value\n", "--replace")
    assert code == 2
    assert only_line(err.decode()) == (
        "error: - has no rows: --replace would empty the whole list; pass --yes to do that"
    )
    assert await bs.count_entries(pg_server, partner_id) == 2
