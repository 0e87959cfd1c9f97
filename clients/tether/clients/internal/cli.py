"""tether-internal: the command-line tool for internal callers.

Commands come from one module per area; each adds its subcommands.
"""

from __future__ import annotations

from types import ModuleType

# First: gRPC reads its log level once, when it is imported.
import tether.clients.grpc_logs  # noqa: F401
from tether.clients import cli


def command_modules() -> list[ModuleType]:
    from tether.clients.guard import commands as guard
    from tether.clients.internal import provisioning_commands

    # Each area appends its module here.
    return [provisioning_commands, guard]


def main(argv: list[str] | None = None) -> None:
    parser = cli.build_parser("tether-internal", "Tether for internal callers.", command_modules())
    cli.main(parser, argv)
