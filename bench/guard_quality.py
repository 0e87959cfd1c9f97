"""How well the guard tells one person from many, on simulated populations.

    python -m bench.guard_quality [--seeds 1 2 3] [--limits 1 2 3 4 5] [--plot FILE.png]

Each seed's population (bench/guard_population.py: 20,000 people over 30
days, households sharing a browser, farmers with nine evasion strategies)
is replayed through a real Tether server's Backtest RPC, once per
registration limit N, with the policy's real window (forever). For every
run it prints:

- false refusal: legitimate registrations refused (households count as one
  browser: up to N accounts each are legitimate);
- farm catch: the farms' accounts beyond N that were refused, overall and
  per evasion strategy;
- for Tether, false refusal in the second half of the period alone: a new
  book is cautious in its first weeks (values look common until seen
  often), so the second half is nearer what a server that has run for
  months refuses;

next to two baselines computed here on the same events: an exact hash of
every component plus the IP address, and the identity Tether used before
(every component but the browser version, ignoring the network). With
--basic the collector's extra signals (canvas, WebGL, cores, touch) are
dropped, leaving only the basic components (browser, OS, screen, fonts,
plugins, language, time zone) that many integrations send.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import redis.asyncio as redis

from bench.guard import POSTGRES_DSN, Server, compiled_server, free_port
from bench.guard_population import DAY, STRATEGIES, Event, Population
from tether.clients.guard.client import BACKTEST_BATCH, backtest_event
from tether.guard.v1 import messages_pb2 as pb

SERVICE = "quality"


def _canonical(components: dict[str, Any], *, version: bool) -> str:
    c = dict(components)
    if not version:
        c.pop("browser_version", None)
    c["fonts"] = sorted({" ".join(f.casefold().split()) for f in c.get("fonts", [])})
    c["plugins"] = sorted(set(c.get("plugins", [])))
    return hashlib.blake2b(json.dumps(c, sort_keys=True).encode(), digest_size=12).hexdigest()


def baseline(events: list[Event], limit: int, key: Callable[[Event], str]) -> list[bool]:
    """Admits at most `limit` accounts per key, forever: the baselines."""
    counted: dict[str, set[str]] = defaultdict(set)
    verdicts = []
    for event in events:
        accounts = counted[key(event)]
        if event.account in accounts or len(accounts) < limit:
            accounts.add(event.account)
            verdicts.append(True)
        else:
            verdicts.append(False)
    return verdicts


def score(events: list[Event], allowed: Iterable[bool], limit: int) -> dict[str, Any]:
    """False refusal and farm catch, as the Backtest summary counts them: a
    legitimate actor's (a person's, a household's) refusals beyond its
    accounts over N are right (one browser), the rest are false."""
    legit = 0
    people: dict[str, list[bool]] = defaultdict(list)
    farms: dict[str, list[bool]] = defaultdict(list)
    strategy_of: dict[str, str] = {}
    for event, ok in zip(events, allowed, strict=True):
        if event.label == "legitimate":
            legit += 1
            people[event.actor].append(ok)
        else:
            farms[event.actor].append(ok)
            strategy_of[event.actor] = event.strategy
    refused_legit = sum(
        verdicts.count(False) - min(verdicts.count(False), max(0, len(verdicts) - limit))
        for verdicts in people.values()
    )
    # The default strategies always (a table's columns), then any other the
    # population's farmers used.
    per: dict[str, list[int]] = {s: [0, 0] for s in STRATEGIES}
    for strategy in strategy_of.values():
        per.setdefault(strategy, [0, 0])
    for actor, verdicts in farms.items():
        excess = max(0, len(verdicts) - limit)
        caught = min(excess, verdicts.count(False))
        per[strategy_of[actor]][0] += caught
        per[strategy_of[actor]][1] += excess
    caught = sum(c for c, _ in per.values())
    excess = sum(e for _, e in per.values())
    return {
        "false_refusal": refused_legit / max(1, legit),
        "catch": caught / max(1, excess),
        "strategies": {s: c / max(1, e) for s, (c, e) in per.items()},
    }


# Events from this far into a population are in its "later" period.
LATER_DAY = 15.0


def from_summary(summary: pb.BacktestSummary) -> dict[str, Any]:
    total = summary.total
    later = next(
        (g.counts for g in summary.groups if g.attribute == "period" and g.value == "later"),
        pb.BacktestCounts(),
    )
    strategies = {
        group.value: group.counts.caught / max(1, group.counts.excess)
        for group in summary.groups
        if group.attribute == "strategy" and group.counts.abusive
    }
    return {
        "false_refusal": total.false_refusals_within_limit / max(1, total.legitimate),
        "false_refusal_later": later.false_refusals_within_limit / max(1, later.legitimate),
        "catch": total.caught / max(1, total.excess),
        "strategies": {s: strategies.get(s, 0.0) for s in STRATEGIES},
        "events_per_second": total.events / summary.seconds if summary.seconds else 0.0,
    }


def _basic(components: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in components.items() if k != "extra"}


BACKTEST = "/tether.guard.v1.FingerprintGuard/Backtest"


def _cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def replay(server: Server, events: list[Event], limit: int) -> dict[str, Any]:
    """One Backtest of the events at limit N. The requests are serialized
    before the clock starts, so the rate is the server's, not this client's;
    also measured per CPU second of the server, which a busy machine does
    not skew."""
    policy = pb.Policy(service_id=SERVICE, register_limit=limit)
    start = pb.BacktestRequest(
        start=pb.BacktestStart(policy=policy, group_by=["strategy", "period"])
    )
    first = min(event.time for event in events)
    messages = [
        backtest_event(
            {
                **event.as_json(SERVICE),
                "period": "later" if event.time - first >= LATER_DAY * DAY else "earlier",
            }
        )
        for event in events
    ]
    requests = [start.SerializeToString()] + [
        pb.BacktestRequest(
            events=pb.BacktestEvents(events=messages[i : i + BACKTEST_BATCH])
        ).SerializeToString()
        for i in range(0, len(messages), BACKTEST_BATCH)
    ]
    call: grpc.aio.StreamStreamMultiCallable[bytes, pb.BacktestResponse] = (
        server.channel.stream_stream(
            BACKTEST, request_serializer=None, response_deserializer=pb.BacktestResponse.FromString
        )
    )
    cpu = _cpu_seconds(server.process.pid)
    began = time.perf_counter()
    summary = None
    async for response in call(iter(requests)):
        if response.HasField("summary"):
            summary = response.summary
    wall = time.perf_counter() - began
    cpu = _cpu_seconds(server.process.pid) - cpu
    assert summary is not None
    result = from_summary(summary)
    result["events_per_second"] = len(events) / wall
    result["events_per_cpu_second"] = len(events) / cpu if cpu else 0.0
    return result


def _compiled_row(compiled: dict[str, Any], python: dict[str, Any]) -> str:
    """The compiled core's replay at N = 3 beside the pure one's: its speed,
    and that it decided the same (the same figures, to the event)."""
    decided = ("false_refusal", "false_refusal_later", "catch", "strategies")
    if any(compiled[key] != python[key] for key in decided):
        raise AssertionError(f"the compiled core decided otherwise: {compiled} != {python}")
    return (
        f"  N = 3, guard core compiled (mypyc): {compiled['events_per_second']:,.0f} events/s, "
        f"{compiled['events_per_cpu_second']:,.0f} per server CPU second "
        f"({compiled['events_per_second'] / python['events_per_second']:.2f}x the pure "
        "Python replay above), the same decisions"
    )


def _row(name: str, r: dict[str, Any]) -> str:
    strategies = " ".join(f"{s[:8]:>8}={v * 100:5.1f}" for s, v in r["strategies"].items())
    fr, catch = r["false_refusal"] * 100, r["catch"] * 100
    later = r.get("false_refusal_later")
    after = f"  (FR from day {LATER_DAY:.0f}: {later * 100:.2f}%)" if later is not None else ""
    return f"  {name:<10} FR {fr:5.2f}%  catch {catch:5.1f}%  {strategies}{after}"


async def run(seeds: list[int], limits: list[int], basic: bool, people: int) -> dict[str, Any]:
    redis_bin = shutil.which("redis-server")
    assert redis_bin, "redis-server is required"
    data_dir = tempfile.mkdtemp(prefix="bench-quality-")
    redis_port = free_port()
    redis_process = subprocess.Popen(  # noqa: ASYNC220 - a daemon for the whole run
        [redis_bin, "--port", str(redis_port), "--save", "", "--appendonly", "no",
         "--dir", data_dir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    probe = redis.Redis.from_url(redis_url)
    for _ in range(100):
        try:
            await probe.ping()
            break
        except (redis.ConnectionError, OSError):
            await asyncio.sleep(0.05)
    await probe.aclose()
    database = f"tether_bench_quality_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f'CREATE DATABASE "{database}"')
    base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    # A replay sends hundreds of scripts at once; on a busy machine the
    # live default bound (0.25 s) is not what is measured here.
    os.environ.setdefault("TETHER_REDIS_TIMEOUT_SECONDS", "10")
    server = Server("tether", redis_url, data_dir, f"{base}/{database}")
    # With TETHER_BENCH_COMPILED: a second server, its guard core compiled
    # (scripts/build-compiled), replays each seed at N = 3 too; its
    # decisions must be the same.
    compiled = await compiled_server(admin, base, database, redis_url, data_dir)
    results: dict[str, Any] = {"seeds": {}, "basic": basic, "people": people}
    try:
        for seed in seeds:
            events = Population(seed, people=people).events()
            if basic:
                for event in events:
                    event.components = _basic(event.components)
            per_seed: dict[str, Any] = {}
            for limit in limits:
                tether = await replay(server, events, limit)
                exact = score(
                    events,
                    baseline(
                        events,
                        limit,
                        lambda e: _canonical(e.components, version=True) + e.client_ip,
                    ),
                    limit,
                )
                before = score(
                    events,
                    baseline(events, limit, lambda e: _canonical(e.components, version=False)),
                    limit,
                )
                per_seed[str(limit)] = {"tether": tether, "exact+ip": exact, "before": before}
                print(f"seed {seed}, N = {limit} ({len(events):,} events, "
                      f"{tether['events_per_second']:,.0f} events/s, "
                      f"{tether['events_per_cpu_second']:,.0f} per server CPU second)")  # fmt: skip
                for name in ("tether", "exact+ip", "before"):
                    print(_row(name, per_seed[str(limit)][name]))
                sys.stdout.flush()
            if compiled is not None and "3" in per_seed:
                print(_compiled_row(await replay(compiled, events, 3), per_seed["3"]["tether"]))
            results["seeds"][str(seed)] = per_seed
    finally:
        await server.close()
        if compiled is not None:
            await compiled.close()
        for name in (database, f"{database}_compiled"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


def averages(
    results: dict[str, Any], name: str, refusal: str = "false_refusal"
) -> dict[int, tuple[float, float]]:
    """N -> (mean false refusal, or the `refusal` figure; mean catch) over the seeds."""
    out: dict[int, tuple[float, float]] = {}
    seeds = list(results["seeds"].values())
    for limit in seeds[0]:
        rows = [seed[limit][name] for seed in seeds]
        out[int(limit)] = (
            sum(r[refusal] for r in rows) / len(rows),
            sum(r["catch"] for r in rows) / len(rows),
        )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label, style in (
        ("tether", "Tether", "o-"),
        ("exact+ip", "exact hash + IP", "s--"),
        ("before", "identity before (no version, no IP)", "^:"),
    ):
        points = averages(results, name)
        xs = [points[n][0] * 100 for n in sorted(points)]
        ys = [points[n][1] * 100 for n in sorted(points)]
        ax.plot(xs, ys, style, label=label)
        for n in sorted(points):
            ax.annotate(f"N={n}", (points[n][0] * 100, points[n][1] * 100),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("legitimate registrations refused (%, log scale)")
    ax.set_ylabel("farms' excess accounts refused (%)")
    seeds = ", ".join(results["seeds"])
    ax.set_title(f"Refusals at register limit N = 1..5, mean of seeds {seeds}")
    ax.axvline(0.5, color="grey", linewidth=0.5)
    ax.axhline(90, color="grey", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--limits", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument("--basic", action="store_true", help="drop the collector's extra signals")
    parser.add_argument("--plot", help="write the false refusal / catch plot here (PNG)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    results = asyncio.run(run(args.seeds, args.limits, args.basic, args.people))
    for name in ("tether", "exact+ip", "before"):
        print(f"\nmean over seeds, {name}:")
        later = averages(results, name, "false_refusal_later") if name == "tether" else {}
        for n, (fr, catch) in averages(results, name).items():
            after = f" (from day {LATER_DAY:.0f}: {later[n][0] * 100:.2f}%)" if later else ""
            print(f"  N = {n}: false refusal {fr * 100:.2f}%{after}, catch {catch * 100:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
