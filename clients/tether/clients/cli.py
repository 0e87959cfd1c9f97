"""What every Tether command-line tool shares: connection flags, running the
async command, and printing errors with their reason and bad fields.

Each tool (tether-admin, tether-device, tether-partner, tether-internal) is a
list of command modules; each module adds its subcommands with
`add_commands(subparsers)` and sets `handler` to an async function taking
(args, channel).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable
from types import ModuleType

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from tether.clients.connection import DEFAULT_ADDRESS, open_channel, resolve_token
from tether.clients.errors import details_of

Handler = Callable[[argparse.Namespace, grpc.aio.Channel], Awaitable[int | None]]


def build_parser(
    prog: str, description: str, modules: Iterable[ModuleType]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--address",
        default=None,
        help=f"server host:port (default $TETHER_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--token", help="bearer token (default $TETHER_TOKEN)")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in modules:
        module.add_commands(sub)
    return parser


def print_message(message: Message) -> None:
    """Prints a response as JSON, with enum names and every field shown."""
    print(
        json_format.MessageToJson(
            message, always_print_fields_with_no_presence=True, indent=2, sort_keys=False
        )
    )


async def _run(args: argparse.Namespace) -> int:
    import os

    address = args.address or os.environ.get("TETHER_ADDRESS", DEFAULT_ADDRESS)
    token = resolve_token(args.token, args.token_file)
    async with open_channel(address, token, tls=args.tls) as channel:
        handler: Handler = args.handler
        try:
            return (await handler(args, channel)) or 0
        except grpc.aio.AioRpcError as error:
            detail = details_of(error)
            print(f"error: {detail.code.name}: {detail.message}", file=sys.stderr)
            if detail.reason:
                print(f"reason: {detail.reason}", file=sys.stderr)
            for path, why in detail.violations.items():
                print(f"  {path}: {why}", file=sys.stderr)
            return 1


def main(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    try:
        sys.exit(asyncio.run(_run(args)))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # Output piped into `head` or similar: the reader has all it wanted.
        sys.stderr.close()
        sys.exit(0)
