"""What metrics and tracing cost: Evaluate and ReportAccountUse on three
servers measured in the same run, in alternating slices.

    python -m bench.observability

- "before": the server as it was before observability was added (the tree
  of the first parent of the commit on main's first-parent line that added
  tether/server/observability/,
  extracted with `git archive` and put first on the child's PYTHONPATH):
  no tracing code and no metrics code at all, not even the checks that
  find them off. Its database is migrated to that tree's own head.
- "off": this tree with TETHER_TRACING and TETHER_METRICS_LISTEN unset: no
  interceptor, no probes, and tether's tracing module never imported (the
  child reports it). The domain counters still count.
- "metrics": this tree serving metrics (TETHER_METRICS_LISTEN): the gRPC
  series interceptor, Redis and PostgreSQL latency histograms.

Targets: off >= 0.98x before (tracing off costs nothing measurable) and
metrics >= 0.95x off, as calls per second and as each server's CPU time
per call (read from /proc over each comparison, warm-up included): on a
machine that others share, throughput swings by 10% from slice to slice,
CPU per call much less. Every server runs in its own process on its own
PostgreSQL database; Redis is a private redis-server (one database per
server). Evaluate is bench.guard's "repeat" workload (a returning
browser's login: one script call, no SQL); each ReportAccountUse binds a
fresh listed account to a fresh device (the one-statement path).
Without git (or outside a checkout) "before" is left out and said so.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as redis

from bench.binding import imei, phone_numbers
from bench.guard import Result, Target, _request, _row, _settle, compare, free_port
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1 import service_pb2_grpc as admin_grpc
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.binding.v1 import service_pb2_grpc as binding_grpc
from tether.clients.connection import open_channel
from tether.common.v1 import types_pb2 as types
from tether.guard.v1 import messages_pb2 as guard_pb
from tether.guard.v1 import service_pb2_grpc as guard_grpc

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_DSN = os.environ.get(
    "TETHER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
SERVICE = "bench"
IN_FLIGHT = int(os.environ.get("TETHER_BENCH_IN_FLIGHT", "16"))
EVALUATE_CALLS = int(os.environ.get("TETHER_BENCH_EVALUATE_CALLS", "12000"))
REPORT_CALLS = int(os.environ.get("TETHER_BENCH_REPORT_CALLS", "4000"))
# bench.guard.compare's warm-up per target, and room for it in the account list.
WARMUP = 300
# (server, its baseline, what the ratio says, target)
PAIRS = (
    ("off", "before", "tracing off / no tracing code", 0.98),
    ("metrics", "off", "metrics on / off", 0.95),
)


# --- the servers (child processes) ---------------------------------------------
async def _serve(kind: str, port: int, redis_url: str, data_dir: str, database_url: str) -> None:
    from tether.server.app import build
    from tether.server.settings import Settings
    from tether.server.shared import digests
    from tether.server.transport.credentials import mint
    from tether.server.transport.principal import CallerKind

    if kind.startswith("metrics"):
        # Read by Settings below (the "before" tree has no such field).
        os.environ["TETHER_METRICS_LISTEN"] = "127.0.0.1:0"
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        database_url=database_url,
        # Small: the machine's PostgreSQL is shared (100 connections in all).
        database_pool_size=4,
        migrate_on_start=True,
        redis_url=redis_url,
        data_dir=Path(data_dir),
        digest_keys=digests.new_key_spec("bench"),
        http_listen="",
        log_level="WARNING",
        report_rate_per_minute=1_000_000_000,
    )
    app = await build(settings)
    await app.start()
    tokens = []
    async with app.runtime.db.transaction() as session:
        for caller in (CallerKind.ADMIN, CallerKind.INTERNAL):
            minted = mint(caller, None, "bench")
            session.add(minted.credential)
            tokens.append(minted.token)
    _settle()
    tracing_loaded = "tether.server.observability.tracing" in sys.modules
    print("READY", *tokens, int(tracing_loaded), flush=True)
    await app.server.wait_for_termination()


def serve(kind: str, port: str, redis_url: str, data_dir: str, database_url: str) -> None:
    from tether.server import logs

    logs.configure("ERROR")
    asyncio.run(_serve(kind, int(port), redis_url, data_dir, database_url))


def _tree_before_observability(into: Path) -> Path | None:
    """This checkout's tree as it was before tether/server/observability/ existed."""
    try:
        added = subprocess.run(
            [
                "git",
                "log",
                # On main's own line: the merge that brought observability
                # in, whose first parent is main as it was without it.
                "--first-parent",
                "--diff-filter=A",
                "--format=%H",
                "--",
                "server/tether/server/observability/setup.py",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if not added:
            return None
        archive = subprocess.run(
            ["git", "archive", f"{added[-1]}^", "server", "generated", "clients"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class Server:
    def __init__(
        self, kind: str, redis_url: str, data_dir: str, database_url: str, tree: Path | None
    ) -> None:
        self.kind = kind
        port = free_port()
        env = dict(os.environ)
        if tree is not None:
            # First on the path: its tether.server is the one imported.
            paths = [str(tree / part) for part in ("server", "generated", "clients")]
            env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.observability",
                "serve",
                kind,
                str(port),
                redis_url,
                data_dir,
                database_url,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("READY "):
                _, self.admin_token, self.internal_token, loaded = line.split()
                self.tracing_loaded = loaded == "1"
                break
        else:
            raise RuntimeError(f"{kind} server did not start")
        self.address = f"127.0.0.1:{port}"
        self.channels: list[Any] = []

    def channel(self, token: str) -> Any:
        channel = open_channel(self.address, token)
        self.channels.append(channel)
        return channel

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system): per call,
        a figure a busy shared machine disturbs less than calls per second."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        self.process.terminate()
        self.process.wait(10)


# --- set-up and load -------------------------------------------------------------
async def _prepare(server: Server, numbers: list[str]) -> tuple[Any, Any]:
    """A partner listing numbers with one preset service, a device
    credential and a guard policy; returns (binding stub as a device, guard stub)."""
    admin = admin_grpc.AdminStub(server.channel(server.admin_token))
    partner_id = f"bench-{secrets.token_hex(3)}"
    await admin.CreatePartner(
        admin_pb.CreatePartnerRequest(
            request_id=secrets.token_hex(8), partner_id=partner_id, display_name="Bench"
        )
    )
    await admin.CreateService(
        admin_pb.CreateServiceRequest(
            request_id=secrets.token_hex(8),
            partner_id=partner_id,
            service_id="service-0",
            display_name="Service 0",
        )
    )
    partner = await admin.CreateCredential(
        admin_pb.CreateCredentialRequest(
            kind=admin_pb.CREDENTIAL_KIND_PARTNER, partner_id=partner_id, label="bench"
        )
    )
    device = await admin.CreateCredential(
        admin_pb.CreateCredentialRequest(kind=admin_pb.CREDENTIAL_KIND_DEVICE, label="bench")
    )
    lists = binding_grpc.BindingStub(server.channel(partner.token))
    for start in range(0, len(numbers), 1000):
        await lists.AddEligibleAccounts(
            binding_pb.AddEligibleAccountsRequest(
                entries=[
                    binding_pb.EligibleAccountEntry(
                        account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value=n)
                    )
                    for n in numbers[start : start + 1000]
                ]
            )
        )
    guard = guard_grpc.FingerprintGuardStub(server.channel(server.internal_token))
    await guard.SetPolicy(
        guard_pb.SetPolicyRequest(
            policy=guard_pb.Policy(
                service_id=SERVICE, login_limit=10_000, login_session_seconds=3600
            )
        )
    )
    return binding_grpc.BindingStub(server.channel(device.token)), guard


def _report_requests(numbers: list[str]) -> list[binding_pb.ReportAccountUseRequest]:
    """Call i binds number i to a new device (the same on every server:
    each has a database of its own)."""
    return [
        binding_pb.ReportAccountUseRequest(
            request_id=secrets.token_hex(8),
            device=types.Device(kind=types.TERMINAL_ID_KIND_IMEI, terminal_id=imei()),
            account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value=number),
        )
        for number in numbers
    ]


def _ratios(results: list[Result], cpu_per_call: dict[str, float], label: str) -> None:
    """Throughput ratios, and the same ratios from the servers' CPU per call."""
    by_name = {r.name.split()[0]: r for r in results}
    print(f"\n{label} at {IN_FLIGHT} in flight")
    print(f"  {'server':<22} {'in':>3} {'calls/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu us':>8}")
    for result in results:
        print(f"{_row(result)} {cpu_per_call[result.name.split()[0]] * 1e6:>8.0f}")
    for kind, baseline, what, target in PAIRS:
        if baseline not in by_name:
            continue
        ratio = by_name[kind].per_second / by_name[baseline].per_second
        cpu_ratio = cpu_per_call[baseline] / cpu_per_call[kind]
        verdict = "ok" if min(ratio, cpu_ratio) >= target else "BELOW TARGET"
        print(
            f"  {what + ':':<32} {ratio:.3f}x calls/s, {cpu_ratio:.3f}x by CPU per call "
            f"(target >= {target}x) {verdict}"
        )


async def _create_database(admin: Any, name: str) -> str:
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


async def main() -> None:
    redis_bin = shutil.which("redis-server")
    assert redis_bin, "redis-server is required"
    work = Path(tempfile.mkdtemp(prefix="bench-observability-"))
    redis_port = free_port()
    redis_process = subprocess.Popen(  # noqa: ASYNC220 - a daemon for the whole run
        [redis_bin, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        cwd=work,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
    for _ in range(100):
        try:
            await client.ping()
            break
        except (redis.ConnectionError, OSError):
            await asyncio.sleep(0.05)
    await client.aclose()
    (work / "tree").mkdir()
    tree = _tree_before_observability(work / "tree")
    # TETHER_BENCH_KINDS adds servers (e.g. "before,off,metrics,off-again":
    # a second "off" shows how far two identical servers differ here).
    kinds = os.environ.get("TETHER_BENCH_KINDS", "before,off,metrics").split(",")
    if tree is None:
        kinds = [kind for kind in kinds if kind != "before"]
    if tree is None:
        print("no git checkout: 'before' (no observability code) left out")
    admin = await asyncpg.connect(POSTGRES_DSN)
    databases = [f"tether_bench_obs_{secrets.token_hex(4)}" for _ in kinds]
    servers: list[Server] = []
    try:
        for n, kind in enumerate(kinds):
            url = await _create_database(admin, databases[n])
            (work / kind).mkdir(exist_ok=True)
            servers.append(
                Server(
                    kind,
                    f"redis://127.0.0.1:{redis_port}/{n + 1}",
                    str(work / kind),
                    url,
                    tree if kind == "before" else None,
                )
            )
        for server in servers:
            loaded = "loaded" if server.tracing_loaded else "never imported"
            print(f"{server.kind}: tether's tracing module {loaded}")
        await _run(servers)
    finally:
        for server in servers:
            await server.close()
        for name in databases:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(work, ignore_errors=True)


async def _run(servers: list[Server]) -> None:
    # Each target's calls use their own indices (compare hands them out):
    # room for every target's warm-up and share of the calls.
    numbers = phone_numbers(len(servers) * (WARMUP + REPORT_CALLS))
    requests = _report_requests(numbers)
    pool = [_request(f"repeat-{i % 256}", f"user{i % 256}") for i in range(256)]
    evaluate_targets, report_targets = [], []
    for server in servers:
        devices, guard = await _prepare(server, numbers)
        await asyncio.gather(*(guard.Evaluate(r) for r in pool))  # the 256 repeat logins

        def evaluate(i: int, guard: Any = guard) -> Any:
            return guard.Evaluate(pool[i % 256])

        def report(i: int, devices: Any = devices) -> Any:
            return devices.ReportAccountUse(requests[i])

        evaluate_targets.append(Target(f"{server.kind} evaluate", evaluate))
        report_targets.append(Target(f"{server.kind} report", report))
    for targets, calls, label in (
        (evaluate_targets, EVALUATE_CALLS, "Evaluate (repeat)"),
        (report_targets, REPORT_CALLS, "ReportAccountUse (new)"),
    ):
        before = {server.kind: server.cpu_seconds() for server in servers}
        results = await compare(targets, IN_FLIGHT, calls, 0)
        # Each server served its warm-up and its calls in this comparison.
        cpu_per_call = {
            server.kind: (server.cpu_seconds() - before[server.kind]) / (WARMUP + calls)
            for server in servers
        }
        _ratios(results, cpu_per_call, label)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(*sys.argv[2:7])
    else:
        asyncio.run(main())
