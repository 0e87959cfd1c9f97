"""Backtest through gRPC and the CLI: history replayed on scratch state,
with event times as the clock, and summarized."""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from sqlalchemy import text

from bench.guard_population import Population
from tests.guard_support import fingerprint, guard_client, guard_of, new_service
from tests.support import RunningServer, expect_error
from tether.clients.guard.client import GuardClient, account, backtest_event
from tether.guard.v1 import messages_pb2 as pb
from tether.server.guard import backtest, convert
from tether.server.guard.decide import Decider
from tether.server.guard.policies import Policy

CLI = str(Path(sys.executable).parent / "tether-internal")
DAY = 86_400.0
T0 = 1_780_000_000.0
TABLES = (
    "guard_policies",
    "guard_entries",
    "guard_links",
    "guard_fingerprints",
    "guard_fingerprint_links",
    "guard_sightings",
    "guard_farmed",
)


def event(
    when: float,
    name: str,
    components: pb.FingerprintComponents,
    ip: str,
    *,
    label: pb.Label.ValueType = pb.LABEL_UNSPECIFIED,
    actor: str = "",
    **attributes: str,
) -> pb.BacktestEvent:
    message = pb.BacktestEvent(
        request=pb.EvaluateRequest(
            action=pb.ACTION_REGISTER, account=account(name), components=components, client_ip=ip
        ),
        label=label,
        actor=actor,
        attributes=attributes,
    )
    message.event_time.FromNanoseconds(int(when * 1e9))
    return message


async def replay(
    guard: GuardClient, policy: pb.Policy, events: list[Any], *, group_by: tuple[str, ...] = ()
) -> tuple[list[pb.BacktestVerdict], pb.BacktestSummary]:
    start = pb.BacktestStart(policy=policy, verdicts=True, group_by=list(group_by))
    verdicts: list[pb.BacktestVerdict] = []
    summary = None
    async for response in guard.backtest(start, events):
        if response.HasField("verdict"):
            verdicts.append(response.verdict)
        else:
            summary = response.summary
    assert summary is not None
    return verdicts, summary


async def _redis_state(redis_url: str) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(count=1000)]
        state = {}
        for key in keys:
            value = await client.dump(key)
            # None: the key expired between the scan and now (another
            # test's); it is absent, not changed.
            if value is not None:
                state[key] = bytes(value)
        return state
    finally:
        await client.aclose()


async def _sql_state(server: RunningServer) -> dict[str, list[tuple[Any, ...]]]:
    state = {}
    async with server.app.runtime.db.sessions() as session:
        for table in TABLES:
            rows = (await session.execute(text(f"SELECT * FROM {table}"))).all()
            state[table] = sorted(tuple(map(repr, row)) for row in rows)
    return state


def _population(service: str, count: int) -> list[pb.BacktestEvent]:
    """A mix: people with browsers of their own, some sharing a phone
    model, and a farm, over a month."""
    rng = secrets.SystemRandom()
    events = []
    for i in range(count):
        when = T0 + 30 * DAY * i / count
        if i % 10 == 0:
            components = fingerprint("farm", languages=[rng.choice(["en", "de", "fr"])])
            ip = f"10.9.{rng.randrange(250)}.{rng.randrange(1, 250)}"
            events.append(
                event(
                    when,
                    f"farm-{i}",
                    components,
                    ip,
                    label=pb.LABEL_ABUSIVE,
                    actor="farm",
                    strategy="combined",
                )
            )
        else:
            seed = "phone" if i % 3 == 0 else str(i)
            ip = f"10.{i % 200}.{(i // 200) % 250}.{1 + i % 250}"
            events.append(
                event(
                    when,
                    f"p-{i}",
                    fingerprint(seed),
                    ip,
                    label=pb.LABEL_LEGITIMATE,
                    actor=f"p-{i}",
                    strategy="person",
                )
            )
        events[-1].request.service_id = service
    return events


async def test_a_backtest_leaves_live_counters_links_and_records_as_they_were(
    pg_server: RunningServer, redis_url: str
) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=2, login_limit=2)
    live = fingerprint(secrets.token_hex(4))
    for i in range(3):
        verdict = await guard.evaluate(service, "register", account(f"live{i}"), live, "10.200.0.1")
        await guard.evaluate(service, "login", account(f"live{i}"), live, "10.200.0.1")
    live_guard = guard_of(pg_server)
    await live_guard.recorder.flush()
    redis_before = await _redis_state(redis_url)
    sql_before = await _sql_state(pg_server)
    book = live_guard.book
    book_before = (book.members(verdict.identity), book.popularity(verdict.identity))

    # The same service's id, so any cross-talk would show.
    events = _population(service, 10_000)
    verdicts, summary = await replay(guard, pb.Policy(service_id=service, register_limit=2), events)
    assert summary.total.events == 10_000
    assert len(verdicts) == 10_000
    assert summary.total.refused > 0

    await live_guard.recorder.flush()
    redis_after = await _redis_state(redis_url)
    # Nothing new, nothing changed (keys of earlier tests may have expired
    # meanwhile: that is Redis's doing, not the backtest's).
    assert set(redis_after) <= set(redis_before)
    assert {k: redis_before[k] for k in redis_after} == redis_after
    assert any(service.encode() in k for k in redis_after)
    assert await _sql_state(pg_server) == sql_before
    assert (book.members(verdict.identity), book.popularity(verdict.identity)) == book_before
    assert not any(e.request.components == live for e in events)


async def test_a_month_of_events_honours_a_day_long_window(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)
    home = f"10.201.{secrets.randbelow(250)}.1"
    browser = fingerprint(secrets.token_hex(4))
    times = [0, 60, 120, 3600, DAY + 60, DAY + 120, DAY + 180, 29 * DAY, 29 * DAY + 60]
    events = [event(T0 + t, f"w{i}", browser, home) for i, t in enumerate(times)]
    policy = pb.Policy(service_id="window", register_limit=3, register_window_seconds=int(DAY))
    verdicts, summary = await replay(guard, policy, events)
    allowed = [v.response.verdict == pb.VERDICT_ALLOW for v in verdicts]
    # Day 1: three, then a refusal. A day later the window let them go.
    assert allowed == [True, True, True, False, True, True, True, True, True]
    assert verdicts[0].response.expire_time.seconds == int(T0 + DAY)
    assert summary.total.refused == 1


async def test_the_summary_counts_false_refusals_and_caught_excess_by_group(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)

    def one_browser(
        start: float, label: pb.Label.ValueType, actors: list[str], strategy: str
    ) -> list[pb.BacktestEvent]:
        """Registrations from one browser of its own, by these actors."""
        browser = fingerprint(secrets.token_hex(4))
        ip = f"10.202.0.{int(start) % 250 + 1}"
        return [
            event(start + i, f"{strategy}{i}", browser, ip, label=label, actor=a, strategy=strategy)
            for i, a in enumerate(actors)
        ]

    events = [
        # A farm of six accounts on one browser: four beyond the limit.
        *one_browser(T0, pb.LABEL_ABUSIVE, ["farm-1"] * 6, "plain"),
        # Four people on one browser, each an actor of their own (the last
        # without an actor, which is one of its own): the third and fourth
        # are refused at limit 2, within their own limits.
        *one_browser(T0 + 100, pb.LABEL_LEGITIMATE, ["h0", "h1", "h2", ""], "strangers"),
        # A household of three, one actor: one browser, so its third is
        # rightly refused (a false refusal, but not within its limit).
        *one_browser(T0 + 200, pb.LABEL_LEGITIMATE, ["household-1"] * 3, "household"),
    ]
    _, summary = await replay(
        guard, pb.Policy(service_id="summary", register_limit=2), events, group_by=("strategy",)
    )
    total = summary.total
    assert (total.events, total.allowed, total.refused) == (13, 6, 7)
    assert (total.legitimate, total.false_refusals) == (7, 3)
    assert total.false_refusals_within_limit == 2
    assert (total.abusive, total.excess, total.caught) == (6, 4, 4)
    groups = {(g.attribute, g.value): g.counts for g in summary.groups}
    assert groups[("strategy", "plain")].caught == 4
    strangers, household = groups[("strategy", "strangers")], groups[("strategy", "household")]
    assert (strangers.false_refusals, strangers.false_refusals_within_limit) == (2, 2)
    assert (household.false_refusals, household.false_refusals_within_limit) == (1, 0)
    assert summary.seconds > 0


async def test_bad_events_get_their_own_error_and_the_replay_goes_on(
    any_server: RunningServer,
) -> None:
    guard = await guard_client(any_server)
    browser = fingerprint(secrets.token_hex(4))
    bad_ip = event(T0 + 11, "b1", browser, "999.1.1.1")
    no_time = event(T0 + 2, "b2", browser, "10.203.0.1")
    no_time.ClearField("event_time")
    events = [
        event(T0 + 10, "ok1", browser, "10.203.0.1"),
        bad_ip,
        event(T0 + 5, "back-in-time", browser, "10.203.0.1"),
        no_time,
        event(T0 + 20, "ok2", browser, "10.203.0.1"),
    ]
    verdicts, summary = await replay(
        guard, pb.Policy(service_id="errors", register_limit=5), events
    )
    assert [v.index for v in verdicts] == [0, 1, 2, 3, 4]
    assert [bool(v.error_message) for v in verdicts] == [False, True, True, True, False]
    assert "client_ip" in verdicts[1].error_message
    assert "time order" in verdicts[2].error_message
    assert "event_time" in verdicts[3].error_message
    assert (summary.total.events, summary.rejected) == (2, 3)


async def test_a_nul_or_an_impossible_time_fails_only_its_event(
    any_server: RunningServer,
) -> None:
    # Events skip the interceptor's walk over every text (it cost more than
    # deciding some of them): Evaluate's own checks refuse a NUL where it
    # matters, and the time is checked per event.
    guard = await guard_client(any_server)
    browser = fingerprint(secrets.token_hex(4))
    home = "10.205.0.1"
    with_nul = pb.FingerprintComponents()
    with_nul.CopyFrom(browser)
    with_nul.fonts.append("Ari\x00al")
    too_late = event(T0 + 3, "late", browser, home)
    too_late.event_time.seconds = 253_402_300_800
    events = [
        event(T0 + 1, "ok1", browser, home),
        event(T0 + 2, "nul", with_nul, home),
        too_late,
        # An attribute is only a name in the summary: a NUL there harms nothing.
        event(T0 + 4, "ok2", browser, home, strategy="a\x00b"),
    ]
    verdicts, summary = await replay(
        guard, pb.Policy(service_id="nul", register_limit=5), events, group_by=("strategy",)
    )
    assert [bool(v.error_message) for v in verdicts] == [False, True, True, False]
    assert "components.fonts" in verdicts[1].error_message
    assert "event_time" in verdicts[2].error_message
    assert (summary.total.events, summary.rejected) == (2, 2)
    assert [(g.attribute, g.value) for g in summary.groups] == [("strategy", "a\x00b")]


async def test_full_collections_are_rarer_only_while_backtests_run(
    any_server: RunningServer,
) -> None:
    # The server runs in this process: its collector is this one. Two runs
    # overlap; the thresholds come back when the last one ends.
    before = gc.get_threshold()
    guard = guard_of(any_server)
    policy = Policy(service_id="collector", register_limit=2)
    runs = [backtest.Backtest(guard, policy, []) for _ in range(2)]
    for i, run in enumerate(runs):
        message = event(T0 + i, f"c{i}", fingerprint(secrets.token_hex(4)), "10.206.0.1")
        await run.add(0, convert.backtest_event(message))
        assert gc.get_threshold()[2] >= backtest.FULL_COLLECTION_AFTER
    for run in runs:
        assert gc.get_threshold()[2] >= backtest.FULL_COLLECTION_AFTER
        await run.finish()
        await run.drop()
    assert gc.get_threshold() == before


async def test_a_backtest_needs_a_start_and_an_operator(any_server: RunningServer) -> None:
    guard = await guard_client(any_server)

    async def only_events() -> list[pb.BacktestResponse]:
        async def requests() -> Any:
            yield pb.BacktestRequest(event=event(T0, "x", fingerprint(), "10.204.0.1"))

        return [r async for r in guard.stub.Backtest(requests())]

    await expect_error(only_events(), grpc.StatusCode.INVALID_ARGUMENT)
    device = GuardClient(any_server.channel(await any_server.credential("device")))
    start = pb.BacktestStart(policy=pb.Policy(service_id="denied", register_limit=1))

    async def as_device() -> list[pb.BacktestResponse]:
        return [r async for r in device.backtest(start, [])]

    await expect_error(as_device(), grpc.StatusCode.PERMISSION_DENIED)
    bad = pb.BacktestStart(policy=pb.Policy(service_id="", register_limit=-1))

    async def bad_policy() -> list[pb.BacktestResponse]:
        return [r async for r in guard.backtest(bad, [])]

    detail = await expect_error(bad_policy(), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(detail.violations) >= {"start.policy.service_id", "start.policy.register_limit"}


def _cli_browser() -> dict[str, object]:
    """The components of a browser of its own, as an events file holds them."""
    return {
        "browser_name": "Chrome",
        "browser_version": "131.0",
        "os_name": "Linux",
        "screen_width": 1280,
        "screen_height": 800,
        "languages": ["en"],
        "fonts": [secrets.token_hex(4)],
    }


async def _cli_backtest(
    server: RunningServer, lines: list[dict[str, object]], tmp_path: Path, *args: str
) -> tuple[int | None, bytes, bytes]:
    """`tether-internal guard backtest` of these events: exit status, stdout, stderr."""
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    process = await asyncio.create_subprocess_exec(
        CLI,
        "--address",
        server.address,
        "--token",
        await server.credential("internal"),
        "guard",
        "backtest",
        str(events),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode, out, err


async def test_cli_backtests_a_file_of_events(pg_server: RunningServer, tmp_path: Path) -> None:
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    browser = _cli_browser()
    lines: list[dict[str, object]] = [
        {
            "account": f"c{i}",
            "components": browser,
            "client_ip": "10.205.0.1",
            "event_time": T0 + i,
            "label": "abusive",
            "actor": "farm",
            "strategy": "plain",
        }
        for i in range(4)
    ]
    verdicts = tmp_path / "verdicts.jsonl"
    code, out, err = await _cli_backtest(
        pg_server,
        lines,
        tmp_path,
        "--policy",
        service,
        "--register-limit",
        "2",
        "--group-by",
        "strategy",
        "--verdicts",
        str(verdicts),
    )
    assert code == 0, err.decode()
    summary = json.loads(out)
    # The live policy's limit (1), overridden by --register-limit 2.
    assert summary["total"]["refused"] == "2" or summary["total"]["refused"] == 2
    assert summary["groups"][0]["value"] == "plain"
    rows = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert [r["response"]["verdict"] for r in rows] == ["VERDICT_ALLOW"] * 2 + ["VERDICT_DENY"] * 2


async def test_cli_says_where_to_read_why_events_were_rejected(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    """An event of another service than the policy's is bad input: counted
    as rejected, not evaluated, and the command says where each reason is."""
    guard = await guard_client(pg_server)
    service = await new_service(guard, register_limit=1)
    browser = _cli_browser()
    lines: list[dict[str, object]] = [
        {"account": "ok", "components": browser, "client_ip": "10.206.0.1", "event_time": T0},
        {
            "service_id": "another-service",
            "account": "other",
            "components": browser,
            "client_ip": "10.206.0.1",
            "event_time": T0 + 1,
        },
    ]
    code, out, err = await _cli_backtest(pg_server, lines, tmp_path, "--policy", service)
    assert code == 0, err.decode()
    summary = json.loads(out)
    assert int(summary["rejected"]) == 1
    assert int(summary["total"]["events"]) == 1
    assert err.decode().splitlines() == [
        "note: 1 of the events were rejected as bad input and not evaluated; "
        "--verdicts FILE lists each one's reason"
    ]
    verdicts = tmp_path / "verdicts.jsonl"
    code, out, err = await _cli_backtest(
        pg_server, lines, tmp_path, "--policy", service, "--verdicts", str(verdicts)
    )
    assert code == 0, err.decode()
    assert f"see {verdicts}" in err.decode()
    rows = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert "not the policy's service" in rows[1]["errorMessage"]


async def test_merging_events_in_a_window_decide_as_one_by_one(
    pg_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A simulated population (bench/guard_population.py) whose farms come
    # back and get joined: with scripts in flight around the merges, the
    # verdicts are those of a replay that waits for every event before the
    # next.
    guard = guard_of(pg_server)
    assert guard.counters.pipelined is not None
    policy = Policy(service_id="merging", register_limit=3)
    events = [
        convert.backtest_event(backtest_event(item.as_json("merging")))
        for item in Population(2, people=1000).events()
    ]
    moves = 0
    move_counts = Decider.move_counts

    async def counted_move(self: Decider, *args: Any, **kwargs: Any) -> list[str]:
        nonlocal moves
        moves += 1
        return await move_counts(self, *args, **kwargs)

    monkeypatch.setattr(Decider, "move_counts", counted_move)

    async def verdicts() -> list[Any]:
        run = backtest.Backtest(guard, policy, [], explained=False)
        done: list[Any] = []
        try:
            for i, item in enumerate(events):
                done += await run.add(i, item)
            done += await run.finish()
        finally:
            await run.drop()
        assert [i for i, _ in done] == list(range(len(events)))
        return [verdict for _, verdict in done]

    windowed = await verdicts()
    assert moves > 20
    monkeypatch.setattr(backtest, "WINDOW", 1)
    assert await verdicts() == windowed
