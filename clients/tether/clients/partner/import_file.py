"""Reading an import CSV: rows of kind,value[,reference], streamed line by line.

Every entry remembers its file line number, so that a rejection names the
line a spreadsheet shows. A row this side can already tell is bad (an
unknown kind, a field over the csv module's limit, bytes that are not UTF-8,
an extra column) is still sent, as an entry of no kind that the server
rejects, so that the server counts every rejection against --max-rejected
in one place; its description here replaces the server's.
"""

from __future__ import annotations

import csv
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tether.binding.v1 import messages_pb2 as pb
from tether.clients import accounts
from tether.clients.failures import CommandError, in_user_terms, unreadable

COLUMNS = ("kind", "value", "reference")
# The csv module's own limit (131,072 characters); a longer field is a bad row.
FIELD_LIMIT = csv.field_size_limit()
# Local reasons kept for the rows the server names (it reports the first 100).
MAX_KEPT = 1000
# What the server calls an entry's fields, and what the file calls them.
FIELDS = {"account.kind": "kind", "account.value": "value", "partner_reference": "reference"}
KINDS = ", ".join(accounts.ACCOUNT_KINDS)
# The server's words for a row's problems, in the command's terms.
FLAGS = {"region_hint": "--region"}


@dataclass(frozen=True)
class Rejection:
    line: int
    # The column ("value"), or "" when the whole row is bad.
    column: str
    description: str

    def shown(self, path: Path) -> str:
        column = f"{self.column}: " if self.column else ""
        return f"{path}:{self.line}: {column}{self.description}"


class ImportFile:
    """An import CSV, opened; entries() reads it once."""

    def __init__(self, path: Path, region_hint: str, *, ignore_extra_columns: bool) -> None:
        self.path = path
        self._region_hint = region_hint
        self._ignore_extra = ignore_extra_columns
        self._stdin = str(path) == "-"
        if self._stdin and sys.stdin is None:
            raise CommandError("-: there is no standard input to read; give the CSV to import")
        try:
            self._file: BinaryIO = sys.stdin.buffer if self._stdin else path.open("rb")
        except OSError as error:
            raise unreadable("", path, error, "give the CSV to import") from None
        self._bad_lines: set[int] = set()
        # Entry index -> its line, and the reasons found here.
        self._lines = array("L")
        self._local: dict[int, Rejection] = {}

    def close(self) -> None:
        if not self._stdin:
            self._file.close()

    def line_of(self, index: int) -> int:
        return self._lines[index] if 0 <= index < len(self._lines) else 0

    def rejection(self, index: int, field: str, description: str) -> Rejection:
        """A rejection the server reported by entry index, in the file's terms."""
        local = self._local.get(index)
        if local is not None:
            return local
        column = FIELDS.get(field, field)
        return Rejection(self.line_of(index), column, in_user_terms(description, FLAGS))

    def entries(self) -> Iterator[pb.EligibleAccountEntry]:
        reader = csv.reader(self._decoded())
        columns = (0, 1, 2)
        width = len(COLUMNS)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield self._reject(start, _csv_problem(error))
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if start == 1 and row[0].strip().lower() == "kind":
                columns, width = self._header(row)
                continue
            if any(n in self._bad_lines for n in range(start, reader.line_num + 1)):
                yield self._reject(start, "not UTF-8 text; save the file as UTF-8")
                continue
            if len(row) > width and not self._ignore_extra and any(f.strip() for f in row[width:]):
                yield self._reject(
                    start,
                    f"{len(row)} columns, expected at most {width} ({', '.join(COLUMNS[:width])});"
                    " --ignore-extra-columns skips the others",
                )
                continue
            yield self._entry(start, [row[c] if c < len(row) else "" for c in columns])

    def _header(self, row: list[str]) -> tuple[tuple[int, int, int], int]:
        names = [name.strip().lower() for name in row]
        unknown = [n for n in names if n not in COLUMNS]
        if unknown and not self._ignore_extra:
            raise CommandError(
                f"{self.path}:1: unknown column {unknown[0]!r}; the columns are kind, value and"
                " reference (--ignore-extra-columns skips others)"
            )
        for required in ("kind", "value"):
            if required not in names:
                raise CommandError(f"{self.path}:1: no {required!r} column in the header")
        at = {name: i for i, name in reversed(list(enumerate(names)))}
        # A missing reference column reads as empty: past the end of every row.
        reference = at.get("reference", len(names) + 1)
        return (at["kind"], at["value"], reference), len(names)

    def _entry(self, line: int, fields: list[str]) -> pb.EligibleAccountEntry:
        kind, value, reference = fields
        if kind.strip().lower() not in accounts.ACCOUNT_KINDS:
            shown = kind.strip()
            return self._reject(
                line, f"unknown account kind {shown!r}; use one of {KINDS}", column="kind"
            )
        self._lines.append(line)
        return pb.EligibleAccountEntry(
            account=accounts.account(kind, value.strip(), self._region_hint),
            partner_reference=reference,
        )

    def _reject(self, line: int, description: str, column: str = "") -> pb.EligibleAccountEntry:
        if len(self._local) < MAX_KEPT:
            self._local[len(self._lines)] = Rejection(line, column, description)
        self._lines.append(line)
        return pb.EligibleAccountEntry()

    def _decoded(self) -> Iterator[str]:
        """The file's lines as text; a line that is not UTF-8 is noted, not fatal."""
        for number, raw in enumerate(self._file, 1):
            # Excel starts its UTF-8 files with a byte-order mark.
            line = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                self._bad_lines.add(number)
                yield line.decode("utf-8", errors="replace")


def _csv_problem(error: csv.Error) -> str:
    if "field limit" in str(error):
        return f"a field longer than {FIELD_LIMIT:,} characters"
    return f"not valid CSV ({error})"
