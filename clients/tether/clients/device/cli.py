"""tether-device: the command-line tool for device callers.

Commands come from one module per area; each adds its subcommands.
"""

from __future__ import annotations

from types import ModuleType

# First: gRPC reads its log level once, when it is imported.
import tether.clients.grpc_logs  # noqa: F401
from tether.clients import cli


def command_modules() -> list[ModuleType]:
    from tether.clients.device import binding, provisioning_commands

    # Each area appends its module here.
    return [binding, provisioning_commands]


def main(argv: list[str] | None = None) -> None:
    parser = cli.build_parser("tether-device", "Tether for device callers.", command_modules())
    cli.main(parser, argv)
