"""tether-device commands of the provisioning area: watch, check, usage."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import grpc

from tether.clients import accounts, arguments
from tether.clients.cli import print_message

# The device is named on the command line as the binding commands name it.
from tether.clients.device.binding import _device as device_of
from tether.clients.device.binding import _device_arguments as _device_args
from tether.clients.device.provisioning import DeviceProvisioning
from tether.clients.errors import details_of, tls_refused
from tether.clients.failures import EXIT_FAILED, CommandError

# Reconnection backoff of `watch`, in seconds: doubled after each attempt.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
# A stream that ends with one of these is a server going away, not a refusal.
RECONNECT_ON = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("watch", help="stream the device's entitlement changes")
    _device_args(p)
    p.add_argument(
        "--after",
        type=arguments.whole(arguments.INT64_MAX),
        default=0,
        help="resume after this position",
    )
    p.add_argument(
        "--count",
        type=arguments.whole(arguments.INT64_MAX),
        default=0,
        help="stop after this many events (0: never)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="stop when the stream ends: exit 0 if the server ended it, 1 if it broke"
        " (default: reconnect)",
    )
    p.set_defaults(handler=watch)

    p = sub.add_parser("check", help="may this account use this service on this device?")
    _device_args(p)
    p.add_argument("account", help="the account, e.g. +4915112345678")
    p.add_argument("--kind", choices=accounts.ACCOUNT_KINDS, default="phone_number")
    p.add_argument("--region", default="", help="region hint for national phone numbers")
    p.add_argument("--partner", required=True)
    p.add_argument("--service", required=True)
    p.set_defaults(handler=check, flags=accounts.ACCOUNT_FLAGS)

    p = sub.add_parser("usage", help="ask the partner for the usage of a service")
    _device_args(p)
    p.add_argument("--binding", required=True, help="binding id")
    p.add_argument("--service", required=True)
    p.add_argument(
        "--timeout", type=arguments.seconds(), default=5.0, help="seconds to wait for the partner"
    )
    p.set_defaults(handler=usage)

    p = sub.add_parser("report-usage", help="record usage of a service measured on the device")
    _device_args(p)
    p.add_argument("--binding", required=True, help="binding id")
    p.add_argument("--service", required=True)
    p.add_argument("figures", nargs="+", help="metric=quantity, e.g. data_mb=30")
    p.set_defaults(handler=report_usage)


async def watch(args: argparse.Namespace, channel: grpc.aio.Channel) -> int:
    """Prints events as they come. When the stream ends (the server stopped
    or restarted), says so and resumes after the last position, waiting
    longer after each failed attempt; --once stops there instead."""
    position, seen = args.after, 0
    delay = FIRST_DELAY
    client = DeviceProvisioning(channel)
    while True:
        try:
            async for event in client.watch(device_of(args), position):
                print_message(event)
                position, seen, delay = event.position, seen + 1, FIRST_DELAY
                if args.count and seen >= args.count:
                    return 0
            why, code = "the server ended the stream", 0
        except grpc.aio.AioRpcError as error:
            if error.code() not in RECONNECT_ON or tls_refused(error):
                raise
            code = EXIT_FAILED
            why = (
                f"cannot reach Tether at {args.address} ({args.address_source})"
                if error.code() == grpc.StatusCode.UNAVAILABLE and not details_of(error).reason
                else f"the stream broke ({error.code().name})"
            )
        if args.once:
            print(f"watch: {why}; stopping (--once)", file=sys.stderr)
            return code
        print(
            f"watch: {why}; reconnecting in {delay:g}s to resume after position {position}",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


async def check(args: argparse.Namespace, channel: grpc.aio.Channel) -> int:
    response = await DeviceProvisioning(channel).check(
        device_of(args),
        accounts.account(args.kind, args.account, args.region),
        args.partner,
        args.service,
    )
    print_message(response)
    # Scripts can branch on the answer.
    return 0 if response.entitled else 3


async def usage(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    print_message(
        await DeviceProvisioning(channel).usage(
            device_of(args), args.binding, args.service, args.timeout
        )
    )


async def report_usage(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    now = datetime.now(UTC)
    events = []
    for figure in args.figures:
        metric, _, quantity = figure.partition("=")
        if not arguments.is_whole(quantity):
            raise CommandError(
                f"{figure[:60]!r}: give metric=quantity, a whole number up to "
                f"{arguments.INT64_MAX:,}, e.g. data_mb=30"
            )
        events.append((now, metric, int(quantity)))
    recorded = await DeviceProvisioning(channel).report_usage(
        device_of(args), args.binding, args.service, events
    )
    print(f"recorded {recorded} usage {'event' if recorded == 1 else 'events'}")
