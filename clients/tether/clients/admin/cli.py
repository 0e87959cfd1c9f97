"""tether-admin: manage partners, preset services and credentials."""

from __future__ import annotations

from tether.clients import cli
from tether.clients.admin import commands


def main(argv: list[str] | None = None) -> None:
    parser = cli.build_parser(
        "tether-admin", "Manage Tether partners, services and credentials.", [commands]
    )
    cli.main(parser, argv)
