"""tether-internal commands of the provisioning area: usage, pipeline, replay."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from tether.clients import accounts, arguments
from tether.clients.cli import print_message
from tether.clients.failures import CommandError
from tether.clients.internal.provisioning import InternalProvisioning
from tether.provisioning.v1 import messages_pb2 as pb

STATES = {
    "pending": pb.INSTRUCTION_STATE_PENDING,
    "leased": pb.INSTRUCTION_STATE_LEASED,
    "confirmed": pb.INSTRUCTION_STATE_CONFIRMED,
    "failed": pb.INSTRUCTION_STATE_FAILED,
    "dead": pb.INSTRUCTION_STATE_DEAD,
}


# QueryUsage's fields -> the flags that set them, for the server's messages.
USAGE_FLAGS = {
    "start_time": "--since",
    "end_time": "--until",
    "device.terminal_id": "--imei",
    "account.value": "--account",
    "partner_id": "--partner",
    "service_id": "--service",
    "binding_id": "--binding",
}


def add_commands(sub: Any) -> None:
    p = sub.add_parser("usage", help="usage per day and totals over a time range")
    p.add_argument("--partner", default="")
    p.add_argument("--service", default="")
    p.add_argument("--imei", default="", help="only this device")
    p.add_argument("--account", default="", help="only this account (with --partner)")
    p.add_argument("--account-kind", choices=accounts.ACCOUNT_KINDS, default="phone_number")
    p.add_argument("--binding", default="")
    p.add_argument(
        "--since", type=arguments.day, help="start day, YYYY-MM-DD (default: 30 days ago)"
    )
    p.add_argument("--until", type=arguments.day, help="end, exclusive (default: now)")
    p.set_defaults(handler=usage, flags=USAGE_FLAGS)

    p = sub.add_parser("pipeline", help="instructions per partner and state, with ages")
    p.add_argument("--partner", default="")
    p.add_argument("--list", choices=STATES, help="also list the partner's instructions in it")
    p.set_defaults(handler=pipeline)

    p = sub.add_parser("replay", help="put a dead instruction back into the pipeline")
    p.add_argument("instruction_id")
    p.set_defaults(handler=replay)


async def usage(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    end = args.until or datetime.now(UTC)
    start = args.since or end - timedelta(days=30)
    async for page in InternalProvisioning(channel).usage(
        start,
        end,
        partner_id=args.partner,
        service_id=args.service,
        device=accounts.device("imei", args.imei) if args.imei else None,
        account=accounts.account(args.account_kind, args.account) if args.account else None,
        binding_id=args.binding,
    ):
        print_message(page)


async def pipeline(args: argparse.Namespace, channel: grpc.aio.Channel) -> int:
    if args.list and not args.partner:
        raise CommandError("--list needs --partner: name the partner whose instructions to list")
    client = InternalProvisioning(channel)
    print_message(await client.pipeline(args.partner))
    if args.list:
        async for record in client.instructions(args.partner, STATES[args.list]):
            print_message(record)
    return 0


async def replay(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    print_message(await InternalProvisioning(channel).replay(args.instruction_id))
