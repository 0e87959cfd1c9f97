"""Binding for partner callers: the library and the tether-partner commands
`services`, `add`, `remove`, `import`, `export` and `bindings`.

Imports stream a CSV of any size: it is read line by line and sent in
batches, so a list of millions of accounts never sits in memory.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1.service_pb2_grpc import AdminStub
from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1.service_pb2_grpc import BindingStub
from tether.clients import accounts
from tether.clients.cli import print_message
from tether.clients.paging import every
from tether.common.v1 import types_pb2 as types

DEFAULT_BATCH = 5000
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
        max_rejected: int = 0,
        batch_size: int = DEFAULT_BATCH,
        on_batch: Callable[[int], None] | None = None,
    ) -> pb.ImportEligibleAccountsResponse:
        """Streams entries in batches; on_batch(n) is told of each batch as it is sent.

        With replace, the list becomes exactly these entries once the stream
        ends; if the call fails, the list is unchanged.
        """

        async def requests() -> AsyncIterator[pb.ImportEligibleAccountsRequest]:
            yield pb.ImportEligibleAccountsRequest(
                header=pb.ImportHeader(
                    partner_id=self.partner_id,
                    mode=pb.IMPORT_MODE_REPLACE if replace else pb.IMPORT_MODE_APPEND,
                    max_rejected=max_rejected,
                )
            )
            for chunk in _batches(entries, batch_size):
                yield pb.ImportEligibleAccountsRequest(batch=pb.ImportBatch(entries=chunk))
                if on_batch is not None:
                    on_batch(len(chunk))

        response: pb.ImportEligibleAccountsResponse = await self._stub.ImportEligibleAccounts(
            requests()
        )
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


def read_csv(lines: Iterable[str], region_hint: str = "") -> Iterator[pb.EligibleAccountEntry]:
    """Entries from CSV rows kind,value[,reference]; an optional header row is skipped.

    Rows are yielded as they are read. An unknown kind or a missing value is
    passed on as is, so the server rejects it and reports its position.
    """
    rows = csv.reader(lines)
    for number, row in enumerate(rows):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if number == 0 and row[0].strip().lower() == "kind":
            continue
        kind = row[0]
        value = row[1].strip() if len(row) > 1 else ""
        reference = row[2] if len(row) > 2 else ""
        yield pb.EligibleAccountEntry(
            account=accounts.account(kind, value, region_hint), partner_reference=reference
        )


def count_rows(path: Path) -> int:
    """Rows of a CSV, without its header: the progress bar's total.

    Counted in binary chunks, so it is quick even for a million lines.
    """
    count = 0
    with path.open("rb") as f:
        first = f.readline()
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
    p.add_argument("csv", type=Path, help="the CSV file")
    p.add_argument("--replace", action="store_true", help="the list becomes exactly the file")
    p.add_argument("--region", default="", help="region of national phone numbers, e.g. DE")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="entries per message")
    p.add_argument("--max-rejected", type=int, default=0, help="fail beyond this many bad rows")
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


def _partner_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--partner", default="", help="the partner (needed with admin credentials only)"
    )


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


async def import_csv(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    path: Path = args.csv
    progress = (
        None if args.no_progress else tqdm(total=count_rows(path), unit=" rows", file=sys.stderr)
    )

    def advance(sent: int) -> None:
        if progress is not None:
            progress.update(sent)

    try:
        with path.open(newline="", encoding="utf-8") as f:
            response = await PartnerBinding(channel, args.partner).import_entries(
                read_csv(f, args.region),
                replace=args.replace,
                max_rejected=args.max_rejected,
                batch_size=args.batch_size,
                on_batch=advance,
            )
    finally:
        if progress is not None:
            progress.close()
    print_message(response)


async def export_csv(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    with (
        nullcontext(sys.stdout)
        if args.csv == "-"
        # A command-line run: the event loop has nothing else to serve meanwhile.
        else Path(args.csv).open("w", newline="", encoding="utf-8") as out  # noqa: ASYNC230
    ):
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS)
        async for entry in PartnerBinding(channel, args.partner).entries():
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
