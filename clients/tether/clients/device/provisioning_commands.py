"""tether-device commands of the provisioning area: watch, check, usage."""

from __future__ import annotations

import argparse
from typing import Any

import grpc

from tether.clients.cli import print_message
from tether.clients.device.provisioning import (
    ACCOUNT_KINDS,
    TERMINAL_ID_KINDS,
    DeviceProvisioning,
    account,
    device,
)


def _device_args(p: Any) -> None:
    p.add_argument("terminal_id", help="the device's terminal id, e.g. its IMEI")
    p.add_argument("--kind", choices=TERMINAL_ID_KINDS, default="imei", help="terminal id kind")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("watch", help="stream the device's entitlement changes")
    _device_args(p)
    p.add_argument("--after", type=int, default=0, help="resume after this position")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.set_defaults(handler=watch)

    p = sub.add_parser("check", help="may this account use this service on this device?")
    _device_args(p)
    p.add_argument("--account", required=True, help="the account, e.g. +4915112345678")
    p.add_argument("--account-kind", choices=ACCOUNT_KINDS, default="phone_number")
    p.add_argument("--region", default="", help="region hint for national phone numbers")
    p.add_argument("--partner", required=True)
    p.add_argument("--service", required=True)
    p.set_defaults(handler=check)

    p = sub.add_parser("usage", help="ask the partner for the usage of a service")
    _device_args(p)
    p.add_argument("--binding", required=True, help="binding id")
    p.add_argument("--service", required=True)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the partner")
    p.set_defaults(handler=usage)


async def watch(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    seen = 0
    async for event in DeviceProvisioning(channel).watch(
        device(args.terminal_id, args.kind), args.after
    ):
        print_message(event)
        seen += 1
        if args.count and seen >= args.count:
            return


async def check(args: argparse.Namespace, channel: grpc.aio.Channel) -> int:
    response = await DeviceProvisioning(channel).check(
        device(args.terminal_id, args.kind),
        account(args.account, args.account_kind, args.region),
        args.partner,
        args.service,
    )
    print_message(response)
    # Scripts can branch on the answer.
    return 0 if response.entitled else 3


async def usage(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    print_message(
        await DeviceProvisioning(channel).usage(
            device(args.terminal_id, args.kind), args.binding, args.service, args.timeout
        )
    )
