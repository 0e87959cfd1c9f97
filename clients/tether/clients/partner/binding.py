"""Binding for partner callers: the library and the tether-partner commands
`services`, `add`, `remove`, `import`, `export` and `bindings`.

Imports stream a CSV of any size: it is read line by line (import_file.py)
and sent in batches, so a list of millions of accounts never sits in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import grpc
from tqdm import tqdm

from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1.service_pb2_grpc import AdminStub
from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1.service_pb2_grpc import BindingStub
from tether.clients import accounts, arguments
from tether.clients.cli import print_message
from tether.clients.errors import details_of
from tether.clients.failures import EXIT_FAILED, CommandError
from tether.clients.output import as_dict
from tether.clients.paging import every
from tether.clients.partner.import_file import ImportFile
from tether.common.v1 import types_pb2 as types

DEFAULT_BATCH = 5000
# Entries per upload message at most (a message is kept under the server's 8 MiB).
MAX_BATCH = 50_000
# What the server's initial metadata holds once it accepted an import's header.
IMPORT_ACCEPTED = ("tether-import", "accepted")
EXPORT_COLUMNS = ["entry_id", "kind", "account_digest", "partner_reference", "create_time"]


class PartnerBinding:
    """A partner's lists and bindings. partner_id may stay empty with a partner credential."""

    def __init__(self, channel: grpc.aio.Channel, partner_id: str = "") -> None:
        self._stub = BindingStub(channel)
        self._admin = AdminStub(channel)
        self.partner_id = partner_id

    async def services(self) -> list[admin_pb.Service]:
        response: admin_pb.ListServicesResponse = await self._admin.ListServices(
            admin_pb.ListServicesRequest(partner_id=self.partner_id)
        )
        return list(response.services)

    async def add(
        self, entries: Iterable[pb.EligibleAccountEntry]
    ) -> pb.AddEligibleAccountsResponse:
        response: pb.AddEligibleAccountsResponse = await self._stub.AddEligibleAccounts(
            pb.AddEligibleAccountsRequest(partner_id=self.partner_id, entries=entries)
        )
        return response

    async def remove(self, items: Iterable[types.Account]) -> int:
        response: pb.RemoveEligibleAccountsResponse = await self._stub.RemoveEligibleAccounts(
            pb.RemoveEligibleAccountsRequest(partner_id=self.partner_id, accounts=items)
        )
        return response.removed_count

    async def import_entries(
        self,
        entries: Iterable[pb.EligibleAccountEntry],
        *,
        replace: bool = False,
        max_rejected: int | None = None,
        batch_size: int = DEFAULT_BATCH,
        on_batch: Callable[[int], None] | None = None,
        on_accepted: Callable[[], None] | None = None,
    ) -> pb.ImportEligibleAccountsResponse:
        """Streams entries in batches; on_batch(n) is told of each batch as it is sent.

        With replace, the list becomes exactly these entries once the stream
        ends; if the call fails, the list is unchanged. max_rejected None
        reports any number of invalid entries; a number fails the import
        (writing nothing) beyond it, 0 on the first. No entry is read before
        the server accepted the header (on_accepted is then called), so a
        wrong partner fails before the upload.
        """
        accepted = asyncio.Event()
        failures: list[Exception] = []

        async def requests() -> AsyncIterator[pb.ImportEligibleAccountsRequest]:
            yield pb.ImportEligibleAccountsRequest(
                header=pb.ImportHeader(
                    partner_id=self.partner_id,
                    mode=pb.IMPORT_MODE_REPLACE if replace else pb.IMPORT_MODE_APPEND,
                    max_rejected=max_rejected or 0,
                    strict=max_rejected is not None,
                )
            )
            await accepted.wait()
            try:
                for chunk in _batches(entries, batch_size):
                    yield pb.ImportEligibleAccountsRequest(batch=pb.ImportBatch(entries=chunk))
                    if on_batch is not None:
                        on_batch(len(chunk))
            except Exception as error:
                # gRPC would only cancel the call: keep the cause for the caller.
                failures.append(error)
                call.cancel()

        call = self._stub.ImportEligibleAccounts(requests())
        try:
            # The server answers an accepted header with initial metadata
            # saying so; a refused one ends the call with the reason.
            metadata = await call.initial_metadata()
            if metadata.get(IMPORT_ACCEPTED[0]) != IMPORT_ACCEPTED[1]:
                response: pb.ImportEligibleAccountsResponse = await call
                return response
            if on_accepted is not None:
                on_accepted()
            accepted.set()
            response = await call
        except asyncio.CancelledError:
            if failures:
                raise failures[0] from None
            raise
        return response

    def entries(self, page_size: int = 1000) -> AsyncIterator[pb.EligibleAccount]:
        return every(
            lambda token: self._stub.ListEligibleAccounts(
                pb.ListEligibleAccountsRequest(
                    partner_id=self.partner_id, page_size=page_size, page_token=token
                )
            ),
            lambda page: page.entries,
        )

    def bindings(
        self, account: types.Account | None = None, include_revoked: bool = False
    ) -> AsyncIterator[pb.AccountBinding]:
        """The partner's bindings (of one account, if given), newest first."""
        request = pb.ListBindingsRequest(include_revoked=include_revoked, page_size=500)
        if account is not None:
            request.account.CopyFrom(pb.PartnerAccount(partner_id=self.partner_id, account=account))
        else:
            request.partner_id = self.partner_id

        def fetch(token: str) -> Awaitable[pb.ListBindingsResponse]:
            request.page_token = token
            return self._stub.ListBindings(request)

        return every(fetch, lambda page: page.bindings)


def _batches(
    entries: Iterable[pb.EligibleAccountEntry], size: int
) -> Iterator[list[pb.EligibleAccountEntry]]:
    chunk: list[pb.EligibleAccountEntry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_rows(path: Path) -> int:
    """Rows of a CSV, without its header: the progress bar's total.

    Counted in binary chunks, so it is quick even for a million lines.
    """
    count = 0
    with path.open("rb") as f:
        first = f.readline().removeprefix(b"\xef\xbb\xbf")
        count += 0 if first.strip().lower().startswith(b"kind") else 1
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def add_commands(sub: Any) -> None:
    p = sub.add_parser("services", help="list the partner's preset services")
    _partner_argument(p)
    p.set_defaults(handler=services)

    for name, handler, text in (
        ("add", add, "add accounts to the eligible list"),
        ("remove", remove, "remove accounts from the eligible list"),
    ):
        p = sub.add_parser(name, help=text)
        _partner_argument(p)
        p.add_argument("values", nargs="+", help="the accounts")
        p.add_argument("--kind", choices=accounts.ACCOUNT_KINDS, default="phone_number")
        p.add_argument("--region", default="", help="region of national phone numbers, e.g. DE")
        if name == "add":
            p.add_argument("--reference", default="", help="your reference for these accounts")
        p.set_defaults(handler=handler)

    p = sub.add_parser("import", help="stream a CSV (kind,value[,reference]) into the list")
    _partner_argument(p)
    p.add_argument("csv", type=Path, help="the CSV file, or - for standard input")
    p.add_argument("--replace", action="store_true", help="the list becomes exactly the file")
    p.add_argument("--region", default="", help="region of national phone numbers, e.g. DE")
    p.add_argument(
        "--batch-size",
        type=arguments.whole(MAX_BATCH, low=1),
        default=DEFAULT_BATCH,
        help=f"entries per message (1-{MAX_BATCH:,})",
    )
    p.add_argument(
        "--max-rejected",
        type=arguments.whole(arguments.INT64_MAX),
        default=0,
        help="import the good rows when at most this many are bad (default 0: any bad row"
        " fails the import and nothing is written)",
    )
    p.add_argument(
        "--ignore-extra-columns", action="store_true", help="skip columns other than these three"
    )
    p.add_argument("--yes", action="store_true", help="with --replace, allow an empty file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=import_csv)

    p = sub.add_parser("export", help="write the eligible list as CSV (digests, not values)")
    _partner_argument(p)
    p.add_argument("csv", help="output file, or - for standard output")
    p.set_defaults(handler=export_csv)

    p = sub.add_parser("bindings", help="list the partner's bindings")
    _partner_argument(p)
    p.add_argument("--account", help="only the bindings of this account")
    p.add_argument("--kind", choices=accounts.ACCOUNT_KINDS, default="phone_number")
    p.add_argument("--region", default="")
    p.add_argument("--all", action="store_true", help="include revoked bindings")
    p.set_defaults(handler=list_bindings)


# Errors about a partner's list name the flag, not the proto field.
PARTNER_FLAGS = {
    "header.partner_id": "--partner",
    "partner_id": "--partner",
    "ERROR_REASON_PARTNER_NOT_FOUND": "--partner",
    "region_hint": "--region",
}


def _partner_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--partner", default="", help="the partner (needed with admin credentials only)"
    )
    parser.set_defaults(flags=PARTNER_FLAGS)


async def services(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    for service in await PartnerBinding(channel, args.partner).services():
        print_message(service)


async def add(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    entries = [
        pb.EligibleAccountEntry(
            account=accounts.account(args.kind, v, args.region), partner_reference=args.reference
        )
        for v in args.values
    ]
    print_message(await PartnerBinding(channel, args.partner).add(entries))


async def remove(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    removed = await PartnerBinding(channel, args.partner).remove(
        [accounts.account(args.kind, v, args.region) for v in args.values]
    )
    print(f"removed {removed}")


async def import_csv(args: argparse.Namespace, channel: grpc.aio.Channel) -> int:
    source = ImportFile(args.csv, args.region, ignore_extra_columns=args.ignore_extra_columns)
    try:
        return await _import(args, channel, source)
    finally:
        source.close()


async def _import(args: argparse.Namespace, channel: grpc.aio.Channel, source: ImportFile) -> int:
    path: Path = args.csv
    entries = source.entries()
    first = next(entries, None)
    if first is None and args.replace and not args.yes:
        _confirm_emptying(path)
    progress: tqdm[Any] | None = None

    def start_progress() -> None:
        nonlocal progress
        if not args.no_progress:
            # Counted by reading the file a second time: only a regular file
            # can be (a pipe read twice gives its rows to the count, not the import).
            total = count_rows(path) if path.is_file() else None
            progress = tqdm(total=total, unit=" rows", file=sys.stderr)

    def advance(sent: int) -> None:
        if progress is not None:
            progress.update(sent)

    try:
        response = await PartnerBinding(channel, args.partner).import_entries(
            itertools.chain([first] if first is not None else [], entries),
            replace=args.replace,
            max_rejected=args.max_rejected,
            batch_size=args.batch_size,
            on_batch=advance,
            on_accepted=start_progress,
        )
    except grpc.aio.AioRpcError as error:
        raise _too_many_rejected(error, source, args.max_rejected) or error from None
    finally:
        if progress is not None:
            progress.close()
    result = as_dict(response)
    rejections = [source.rejection(r.index, r.field, r.description) for r in response.rejected]
    result["rejected"] = [
        {"line": r.line, "column": r.column, "description": r.description} for r in rejections
    ]
    print(json.dumps(result, indent=2))
    if not response.rejected_count:
        return 0
    for rejection in rejections:
        print(rejection.shown(path), file=sys.stderr)
    rows = "row was" if response.rejected_count == 1 else "rows were"
    print(
        f"error: {path}: {response.rejected_count} {rows} rejected (within --max-rejected"
        f" {args.max_rejected}); the other rows were imported",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _too_many_rejected(
    error: grpc.aio.AioRpcError, source: ImportFile, max_rejected: int
) -> CommandError | None:
    """The server refused the import for its bad rows: name them by line."""
    detail = details_of(error)
    rows = [(path, why) for path, why in detail.violations.items() if path.startswith("entries[")]
    if detail.code != grpc.StatusCode.INVALID_ARGUMENT or not rows:
        return None
    for path, why in rows:
        index, _, field = path.removeprefix("entries[").partition("].")
        print(source.rejection(int(index), field, why).shown(source.path), file=sys.stderr)
    fix = (
        "fix those rows, or pass --max-rejected N to import the others"
        if max_rejected == 0
        else f"more than --max-rejected {max_rejected}"
    )
    return CommandError(f"{source.path}: rows rejected ({fix}); nothing was imported", EXIT_FAILED)


def _confirm_emptying(path: Path) -> None:
    """--replace with a file of no rows would empty the list: make sure it is meant."""
    if str(path) == "-" or not sys.stdin.isatty():
        # No one to ask: standard input is the file, or no terminal.
        raise CommandError(
            f"{path} has no rows: --replace would empty the whole list; pass --yes to do that"
        )
    answer = input(f"{path} has no rows: empty the whole list? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("nothing changed", EXIT_FAILED)


async def export_csv(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    target = Path(args.csv)
    if args.csv == "-":
        await _export(channel, args.partner, sys.stdout)
        return
    if _device_or_pipe(target):
        # /dev/stdout, a FIFO: written as it goes.
        with target.open("w", newline="", encoding="utf-8") as out:  # noqa: ASYNC230
            await _export(channel, args.partner, out)
        return
    # A file is written beside itself and moved over it once complete: a
    # refused or broken export leaves it as it was.
    partial = target.with_name(f".{target.name}.partial")
    try:
        # A command-line run: the event loop has nothing else to serve meanwhile.
        with partial.open("w", newline="", encoding="utf-8") as out:
            await _export(channel, args.partner, out)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _device_or_pipe(path: Path) -> bool:
    return path.exists() and not path.is_file()


async def _export(channel: grpc.aio.Channel, partner: str, out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(EXPORT_COLUMNS)
    async for entry in PartnerBinding(channel, partner).entries():
        writer.writerow(
            [
                entry.entry_id,
                accounts.ACCOUNT_KIND_NAMES.get(entry.account_kind, "unspecified"),
                entry.account_digest,
                entry.partner_reference,
                entry.create_time.ToJsonString(),
            ]
        )


async def list_bindings(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    account = accounts.account(args.kind, args.account, args.region) if args.account else None
    async for binding in PartnerBinding(channel, args.partner).bindings(account, args.all):
        print_message(binding)
