"""`tether-internal guard ...`: evaluate, policies, identity look-ups, rebuild."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import grpc

from tether.clients import arguments
from tether.clients.cli import print_message
from tether.clients.failures import CommandError, first_line, parse_message, read_text, unreadable
from tether.clients.guard.client import (
    ACCOUNT_KINDS,
    ACTIONS,
    GuardClient,
    account,
    backtest_event,
)
from tether.clients.output import as_dict
from tether.guard.v1 import messages_pb2 as pb

MODES = {"enforce": pb.MODE_ENFORCE, "shadow": pb.MODE_SHADOW}
# Evaluate's fields, as the evaluate command's flags.
EVALUATE_FLAGS = {"client_ip": "--ip", "room_id": "--room", "region_hint": "--region"}
FAILURES = {"open": pb.REDIS_FAILURE_FAIL_OPEN, "closed": pb.REDIS_FAILURE_FAIL_CLOSED}
# --flag -> Policy field, for `policy set`.
NUMBERS = {
    "register_limit": "accounts registered per fingerprint (0: no limit)",
    "register_window_seconds": "how long a registration counts (0: forever)",
    "login_limit": "accounts logged in at once per fingerprint (0: no limit)",
    "login_session_seconds": "login session lifetime without renewal",
    "collaborate_limit": "accounts of one room per fingerprint (0: no limit)",
    "room_membership_seconds": "how long a room join counts",
}


def _number_flags(p: argparse.ArgumentParser) -> None:
    """The policy's numbers: limits are int32 fields, seconds int64."""
    for name, help_text in NUMBERS.items():
        high = arguments.INT64_MAX if name.endswith("_seconds") else arguments.INT32_MAX
        p.add_argument(
            "--" + name.replace("_", "-"), type=arguments.whole(high), dest=name, help=help_text
        )


def _account_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("account", help="the account value")
    p.add_argument("--kind", choices=ACCOUNT_KINDS, default="login_id", help="account kind")
    p.add_argument("--region", default="", help="region hint for phone numbers")


def add_commands(sub: Any) -> None:
    guard = sub.add_parser("guard", help="FingerprintGuard: evaluate, policies, look-ups")
    cmds = guard.add_subparsers(dest="guard_command", required=True)

    p = cmds.add_parser("evaluate", help="evaluate an action from a fingerprint")
    p.add_argument("service_id")
    p.add_argument("action", choices=ACTIONS)
    _account_args(p)
    p.add_argument(
        "--components",
        required=True,
        help="fingerprint components as JSON (proto field names), or @file, or - for stdin",
    )
    p.add_argument("--ip", required=True, help="the browser's IP address")
    p.add_argument("--room", default="", help="room id, for collaborate")
    p.set_defaults(handler=evaluate, flags=EVALUATE_FLAGS)

    policy = cmds.add_parser("policy", help="read or change policies")
    pcmds = policy.add_subparsers(dest="policy_command", required=True)
    p = pcmds.add_parser("get", help="show a service's policy")
    p.add_argument("service_id")
    p.set_defaults(handler=get_policy)
    p = pcmds.add_parser("list", help="list every policy")
    p.set_defaults(handler=list_policies)
    p = pcmds.add_parser(
        "set", help="create a policy or change the given fields (others stay as they are)"
    )
    p.add_argument("service_id")
    _number_flags(p)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--redis-failure", choices=FAILURES, dest="redis_failure")
    p.add_argument(
        "--allow-identity",
        action="append",
        dest="allowed_identities",
        help="identity never limited; repeat; replaces the list ('' to clear)",
    )
    p.add_argument(
        "--allow-account",
        action="append",
        dest="allowed_accounts",
        help="login_id never limited; repeat; replaces the list ('' to clear)",
    )
    p.set_defaults(handler=set_policy)

    p = cmds.add_parser("identity-accounts", help="accounts counted for an identity")
    p.add_argument("identity")
    p.add_argument("--service", default="")
    p.set_defaults(handler=identity_accounts)

    p = cmds.add_parser("account-identities", help="identities an account was counted from")
    _account_args(p)
    p.add_argument("--service", default="")
    p.set_defaults(handler=account_identities)

    p = cmds.add_parser("rebuild", help="rewrite the Redis counters from SQL")
    p.add_argument("--service", default="", help="only this service")
    p.set_defaults(handler=rebuild)

    _add_identity_commands(cmds)
    _add_backtest(cmds)


def _add_identity_commands(cmds: Any) -> None:
    p = cmds.add_parser("explain", help="an identity's fingerprints, links and merges")
    p.add_argument("identity", help="an identity (or fingerprint) Evaluate returned")
    p.set_defaults(handler=explain)

    p = cmds.add_parser("unlink", help="split a fingerprint from the identity it was linked to")
    p.add_argument("fingerprint", help="Explanation.fingerprint of the wrongly linked browser")
    p.add_argument("--reason", default="", help="why, for the record")
    p.set_defaults(handler=unlink)

    p = cmds.add_parser("merge", help="join two identities known to be one browser")
    p.add_argument("identity", help="the identity that stays")
    p.add_argument("other", help="the identity joined into it")
    p.add_argument("--reason", default="", help="why, for the record")
    p.set_defaults(handler=merge)


def _add_backtest(cmds: Any) -> None:
    p = cmds.add_parser(
        "backtest",
        help="replay historical events against a policy, on scratch state",
        description=(
            "Reads events (JSON lines: service_id, action, account, components, client_ip, "
            "event_time, and optionally label legitimate/abusive, actor and any attribute to "
            "group by) in time order, and prints the summary."
        ),
    )
    p.add_argument("events", help="a JSON-lines file of events, or - for stdin")
    p.add_argument(
        "--policy",
        required=True,
        help="the policy to try: a service id (its live policy), or @file with a Policy as JSON",
    )
    _number_flags(p)
    p.add_argument("--mode", choices=MODES)
    p.add_argument(
        "--group-by", action="append", default=[], help="break the summary down by an attribute"
    )
    p.add_argument("--verdicts", help="also write each event's verdict to this JSON-lines file")
    p.set_defaults(handler=backtest)


def _components_arg(value: str) -> pb.FingerprintComponents:
    fix = "give the components collector.js sent, as a JSON object of proto field names"
    if value == "-":
        if sys.stdin is None:
            raise CommandError(f"--components -: there is no standard input to read; {fix}")
        try:
            # A BOM, as @file allows it (utf-8-sig).
            text, source = sys.stdin.read().removeprefix("\ufeff"), "--components - (stdin)"
        except UnicodeDecodeError as error:
            raise unreadable("--components", "- (stdin)", error, fix) from None
    elif value.startswith("@"):
        text, source = read_text("--components", value[1:], fix), f"--components {value}"
    else:
        text, source = value, "--components"
    return parse_message(text, source, fix, pb.FingerprintComponents())


async def evaluate(args: argparse.Namespace, channel: grpc.aio.Channel) -> int:
    response = await GuardClient(channel).evaluate(
        args.service_id,
        args.action,
        account(args.account, args.kind, args.region),
        _components_arg(args.components),
        args.ip,
        room_id=args.room,
    )
    print_message(response)
    return 0 if response.verdict == pb.VERDICT_ALLOW else 3


async def get_policy(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    print_message(await GuardClient(channel).get_policy(args.service_id))


async def list_policies(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    async for policy in GuardClient(channel).list_policies():
        print_message(policy)


async def set_policy(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    policy = pb.Policy(service_id=args.service_id)
    only: list[str] = []
    for name in NUMBERS:
        if getattr(args, name) is not None:
            setattr(policy, name, getattr(args, name))
            only.append(name)
    if args.mode:
        policy.mode = MODES[args.mode]
        only.append("mode")
    if args.redis_failure:
        policy.redis_failure = FAILURES[args.redis_failure]
        only.append("redis_failure")
    if args.allowed_identities is not None:
        policy.allowed_identities.extend(i for i in args.allowed_identities if i)
        only.append("allowed_identities")
    allowed: list[Any] = []
    if args.allowed_accounts is not None:
        allowed = [account(a) for a in args.allowed_accounts if a]
        only.append("allowed_accounts")
    print_message(
        await GuardClient(channel).set_policy(policy, only=only, allowed_accounts=allowed)
    )


async def identity_accounts(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    async for link in GuardClient(channel).identity_accounts(args.identity, args.service):
        print_message(link)


async def account_identities(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    ref = account(args.account, args.kind, args.region)
    async for link in GuardClient(channel).account_identities(ref, args.service):
        print_message(link)


async def rebuild(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    restored = await GuardClient(channel).rebuild(args.service)
    print(json.dumps({"entriesRestored": restored}))


async def explain(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    print_message(await GuardClient(channel).explain_identity(args.identity))


async def unlink(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    print_message(await GuardClient(channel).unlink(args.fingerprint, args.reason))


async def merge(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    identity = await GuardClient(channel).merge(args.identity, args.other, args.reason)
    print(json.dumps({"identity": identity}))


async def _backtest_policy(args: argparse.Namespace, client: GuardClient) -> pb.Policy:
    if args.policy.startswith("@"):
        fix = "give a Policy as JSON (guard policy get prints one)"
        text = await asyncio.to_thread(read_text, "--policy", args.policy[1:], fix)
        policy = parse_message(text, f"--policy {args.policy[1:]}", fix, pb.Policy())
    else:
        policy = await client.get_policy(args.policy)
    for name in NUMBERS:
        if getattr(args, name) is not None:
            setattr(policy, name, getattr(args, name))
    if args.mode:
        policy.mode = MODES[args.mode]
    return policy


_EVENTS_FIX = "give JSON lines of events (see tether-internal guard backtest --help)"


def _same_file(events: str, verdicts: str) -> bool:
    try:
        return events != "-" and os.path.samefile(events, verdicts)
    except OSError:
        return False  # one of them does not exist (yet): not the same


class _Events:
    """The events file, read as the stream sends it. A bad line ends the
    stream and is kept in `problem`: an exception raised inside the request
    stream would only cancel the call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problem = ""
        if path == "-" and sys.stdin is None:
            raise CommandError(f"-: there is no standard input to read; {_EVENTS_FIX}")
        try:
            self._stream = sys.stdin if path == "-" else open(path, encoding="utf-8-sig")  # noqa: SIM115 - closed after reading
        except OSError as error:
            raise unreadable("", path, error, _EVENTS_FIX) from None

    def __iter__(self) -> Iterator[pb.BacktestEvent]:
        try:
            for number, line in enumerate(self._stream, 1):
                if not line.strip():
                    continue
                try:
                    event = backtest_event(json.loads(line))
                except RecursionError:
                    self.problem = f"{self.path}:{number}: nested too deeply; {_EVENTS_FIX}"
                    return
                except Exception as exc:  # whatever fails to convert is the line's fault
                    self.problem = f"{self.path}:{number}: {first_line(exc)}; {_EVENTS_FIX}"
                    return
                yield event
        except UnicodeDecodeError as error:
            self.problem = str(unreadable("", self.path, error, _EVENTS_FIX))
        finally:
            if self._stream is not sys.stdin:
                self._stream.close()


async def backtest(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    client = GuardClient(channel)
    start = pb.BacktestStart(
        policy=await _backtest_policy(args, client),
        verdicts=bool(args.verdicts),
        group_by=args.group_by,
    )
    if args.verdicts is not None and (
        not args.verdicts or await asyncio.to_thread(_same_file, args.events, args.verdicts)
    ):
        raise CommandError(
            f"--verdicts {args.verdicts!r}: give a file of its own for the verdicts "
            "(not the events file, which it would empty)"
        )
    # The start alone first: a policy the server refuses is said plainly, not
    # lost in a race with the events already streaming.
    async for _ in client.backtest(start, ()):
        pass
    events = _Events(args.events)
    out = await asyncio.to_thread(open, args.verdicts, "w") if args.verdicts else None
    summary = None
    try:
        async for response in client.backtest(start, events):
            if response.HasField("summary"):
                summary = response.summary
            elif out is not None:
                out.write(json.dumps(as_dict(response.verdict), sort_keys=True) + "\n")
    finally:
        if out is not None:
            out.close()
    if events.problem:
        raise CommandError(events.problem)
    if summary is not None:
        print_message(summary)
        if summary.rejected:
            # Bad events are counted, not evaluated: say where to read why
            # (an event of another service than the policy's is one).
            where = f"see {args.verdicts}" if args.verdicts else "--verdicts FILE lists"
            print(
                f"note: {summary.rejected} of the events were rejected as bad input and not "
                f"evaluated; {where} each one's reason",
                file=sys.stderr,
            )
