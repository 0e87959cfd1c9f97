"""`tether-server`: run the server, apply migrations, or issue an admin token."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

from pydantic import ValidationError

from tether.server import logs
from tether.server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tether-server", description="Tether gRPC server. Settings: TETHER_* variables."
    )
    sub = parser.add_subparsers(dest="command", metavar="{serve,migrate,create-admin}")
    serve_command = sub.add_parser("serve", help="run the server (default)")
    serve_command.add_argument(
        "--workers",
        type=_worker_count,
        help="worker processes sharing the port (default: TETHER_WORKERS, else 1)",
    )
    # A supervisor's worker (tether.server.workers starts it); not for people.
    worker = sub.add_parser("worker")
    worker.add_argument("--control-fd", type=int, required=True)
    sub.add_parser("migrate", help="apply database migrations and exit")
    admin = sub.add_parser("create-admin", help="issue an admin credential and print its token")
    admin.add_argument("--label", default="created by tether-server create-admin")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        # One line naming the variable, not pydantic's report and a traceback.
        error = exc.errors()[0]
        name = "TETHER_" + "_".join(str(part) for part in error["loc"]).upper()
        parser.exit(2, f"tether-server: {name}: {error['msg']} (got {error['input']!r})\n")
    if args.command == "worker":
        index = int(os.environ.get("TETHER_WORKER_INDEX", "0"))
        logs.configure(settings.log_level, settings.log_format, worker=index)
        from tether.server.app import serve_worker

        asyncio.run(serve_worker(settings, socket.socket(fileno=args.control_fd)))
        return
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        asyncio.run(_migrate(settings.effective_database_url))
    elif args.command == "create-admin":
        asyncio.run(_create_admin(settings, args.label))
    elif (getattr(args, "workers", None) or settings.workers) > 1:
        from tether.server.workers import supervise

        asyncio.run(supervise(settings, args.workers or settings.workers))
    else:
        from tether.server.app import serve

        # The index a supervisor's worker gets, for what reads it (metrics);
        # a process started as one of several keeps the one it was given.
        os.environ.setdefault("TETHER_WORKER_INDEX", "0")
        asyncio.run(serve(settings))


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, not {text!r}")
    return count


async def _migrate(database_url: str) -> None:
    from tether.server.storage import migrate

    applied = await migrate.upgrade_reporting(database_url)
    if not applied:
        print(f"nothing to apply: the database is at {migrate.head_revision()}")
        return
    noun = "migration" if len(applied) == 1 else "migrations"
    print(f"applied {len(applied)} {noun}:")
    for line in applied:
        print(f"  {line}")


async def _create_admin(settings: Settings, label: str) -> None:
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from tether.server.storage.database import Database
    from tether.server.transport.credentials import create_admin

    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url, 1)
    try:
        print(await create_admin(db, label))
    except (OperationalError, ProgrammingError) as exc:
        # No tables yet (or no database): a step to take, not a traceback.
        raise SystemExit(
            "tether-server create-admin: the database is not ready "
            f"({str(exc.orig).splitlines()[0]}); run `tether-server migrate` first"
        ) from None
    finally:
        await db.close()


if __name__ == "__main__":
    main()
