"""What every Tether command-line tool shares: connection flags, running the
async command, and printing its output and its errors.

Each tool (tether-admin, tether-device, tether-partner, tether-internal) is a
list of command modules; each module adds its subcommands with
`add_commands(subparsers)` and sets `handler` to an async function taking
(args, channel). A subcommand may also set `flags`: proto field paths (and
error reasons) -> the flag that sets them, so errors name the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from types import ModuleType

import grpc
from google.protobuf.message import Message

from tether.clients.connection import (
    DEFAULT_ADDRESS,
    check_address,
    open_channel,
    resolve_tls,
    resolve_token,
)
from tether.clients.failures import (
    EXIT_FAILED,
    EXIT_USAGE,
    CommandError,
    rpc_failure,
    tls_failure,
    unreadable,
)
from tether.clients.output import as_dict

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
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    parser.add_argument(
        "--ca",
        help="PEM CA that signs the server's certificate; implies TLS (default $TETHER_CA_FILE)",
    )
    parser.add_argument(
        "--cert", help="PEM client certificate for mutual TLS (default $TETHER_CERT_FILE)"
    )
    parser.add_argument("--key", help="PEM key of --cert (default $TETHER_KEY_FILE)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in modules:
        module.add_commands(sub)
    return parser


def print_message(message: Message) -> None:
    """Prints a response as JSON: camelCase names, enum names, every field
    shown, and 64-bit counts as numbers."""
    print(json.dumps(as_dict(message), indent=2))


async def _run(args: argparse.Namespace) -> int:
    if args.address:
        source = "--address"
    elif os.environ.get("TETHER_ADDRESS"):
        source = "TETHER_ADDRESS"
    else:
        source = "the default address"
    address = check_address(
        args.address or os.environ.get("TETHER_ADDRESS") or DEFAULT_ADDRESS, source
    )
    # Commands that explain a failure themselves name the address tried, and where it came from.
    args.address, args.address_source = address, source
    token = resolve_token(args.token, args.token_file)
    tls = resolve_tls(args.tls, args.ca, args.cert, args.key)
    async with open_channel(address, token, tls=tls) as channel:
        handler: Handler = args.handler
        try:
            return (await handler(args, channel)) or 0
        except grpc.aio.AioRpcError as error:
            broken = tls_failure(error, address, bool(tls))
            if broken is not None:
                print(f"error: {broken}", file=sys.stderr)
                return EXIT_USAGE
            print(
                f"error: {rpc_failure(error, address, getattr(args, 'flags', {}))}", file=sys.stderr
            )
            return EXIT_FAILED


def main(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    try:
        sys.exit(asyncio.run(_run(args)))
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.code)
    except BrokenPipeError:
        # Output piped into `head` or similar: the reader has all it wanted.
        _drop_stdout()
        sys.exit(0)
    except OSError as error:
        if not error.filename:
            # Reading or writing failed (a full disk, an I/O error).
            _drop_stdout()
            print(
                f"error: input/output failed ({error.strerror or error}); check the disk and "
                "the files the command reads and writes",
                file=sys.stderr,
            )
            sys.exit(EXIT_FAILED)
        # A file a command opens itself (an output file, an input stream).
        fix = "check the path and its permissions"
        failure = unreadable("", error.filename, error, fix)
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(failure.code)
    except KeyboardInterrupt:
        sys.exit(130)
    except (Exception, asyncio.CancelledError) as error:
        # A failure no command foresaw is a bug in the tool, but still one
        # line: what happened, and that it is not the user's doing.
        what = str(error).strip().splitlines()[:1]
        print(
            f"error: the command failed unexpectedly ({type(error).__name__}"
            f"{': ' + what[0] if what else ''}); this is a bug in {parser.prog}, please report it",
            file=sys.stderr,
        )
        sys.exit(EXIT_FAILED)


def _drop_stdout() -> None:
    """Points stdout at /dev/null: what is still buffered for a reader that
    is gone (or a disk that is full) would fail again as Python exits."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
