"""tether-admin: manage partners, preset services and credentials."""

from __future__ import annotations

# First: gRPC reads its log level once, when it is imported.
import tether.clients.grpc_logs  # noqa: F401
from tether.clients import cli
from tether.clients.admin import commands


def main(argv: list[str] | None = None) -> None:
    parser = cli.build_parser(
        "tether-admin", "Manage Tether partners, services and credentials.", [commands]
    )
    cli.main(parser, argv)
