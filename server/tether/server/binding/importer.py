"""Bulk import of an eligible list, inside one transaction per stream.

ImportRun keeps that transaction in a task of its own, fed by the stream.

Each batch is normalized and digested here, then handed to the store's
ListImport, which merges it into the list (binding/store_sqlalchemy.py,
binding/store_postgres.py). While the database merges one batch, the next
one is being normalized (in a worker process when TETHER_IMPORT_WORKERS >
0), so the two costs overlap. A stream that fails or is cancelled rolls the
transaction back, so it changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from tether.common.v1.errors_pb2 import ErrorReason
from tether.common.v1.types_pb2 import AccountKind
from tether.server.binding.eligible import MAX_REFERENCE
from tether.server.binding.store import BindingStore, ListImport, StagedRow
from tether.server.errors import FieldViolation, InvalidArgument
from tether.server.shared import accounts
from tether.server.shared.digests import Digester, DigestKey
from tether.server.storage.database import Database

MAX_REPORTED_REJECTIONS = 100
UNKNOWN_KIND = "unknown account kind; use one of " + ", ".join(
    value.name for value in AccountKind.DESCRIPTOR.values if value.number
)

# (account kind or "" when unknown, value, region hint, partner reference)
RawEntry = tuple[str, str, str, str]


@dataclass(frozen=True)
class Rejection:
    index: int
    field: str
    description: str


@dataclass(frozen=True)
class ImportSpec:
    """What an import stream asked for, from its header."""

    partner_id: str
    # The list becomes exactly the stream (else: the stream is added).
    replace: bool
    # Fail beyond this many invalid entries; 0: report any number, unless strict.
    max_rejected: int = 0
    # max_rejected is a limit even at 0 (the command line's default).
    strict: bool = False


@dataclass
class ImportResult:
    received: int = 0
    imported: int = 0
    rejected: int = 0
    removed: int = 0
    rejections: list[Rejection] = field(default_factory=list)


def prepare(
    key: DigestKey, first_index: int, entries: Sequence[RawEntry]
) -> tuple[list[StagedRow], list[Rejection]]:
    """Normalizes and digests one batch: the hot loop of an import.

    A plain function of picklable values, so it can run in a worker process.
    """
    normalize = accounts.normalize_account
    rows: list[StagedRow] = []
    rejections: list[Rejection] = []
    for offset, (kind, value, region_hint, reference) in enumerate(entries):
        index = first_index + offset
        if not kind:
            rejections.append(Rejection(index, "account.kind", UNKNOWN_KIND))
            continue
        if len(reference) > MAX_REFERENCE or not reference.isprintable():
            rejections.append(
                Rejection(
                    index,
                    "partner_reference",
                    f"at most {MAX_REFERENCE} printable characters on one line",
                )
            )
            continue
        try:
            normalized = normalize(kind, value, region_hint)
        except ValueError as exc:
            rejections.append(Rejection(index, "account.value", str(exc)))
            continue
        rows.append((index, kind, key.digest(kind, normalized), reference))
    return rows, rejections


class Import:
    """One import stream, inside the caller's transaction.

    Call start(), add() per batch, then finish(); always close() (in a
    finally) so that no write is left running when the transaction ends.
    """

    def __init__(
        self,
        writer: ListImport,
        digester: Digester,
        spec: ImportSpec,
        executor: Executor | None = None,
    ) -> None:
        self._writer = writer
        self._key = digester.current
        self._replace = spec.replace
        self._max_rejected = spec.max_rejected
        self._limited = spec.strict or spec.max_rejected > 0
        self._executor = executor
        self._writing: asyncio.Task[None] | None = None
        self.result = ImportResult()

    async def start(self) -> None:
        await self._writer.start()

    async def add(self, entries: Sequence[RawEntry]) -> None:
        first = self.result.received
        self.result.received += len(entries)
        if self._executor is None:
            rows, rejections = prepare(self._key, first, entries)
        else:
            loop = asyncio.get_running_loop()
            rows, rejections = await loop.run_in_executor(
                self._executor, prepare, self._key, first, entries
            )
        self._note(rejections)
        await self._wait_for_writing()
        if rows:
            # Runs while the caller receives and normalizes the next batch.
            self._writing = asyncio.create_task(self._writer.write(rows))

    def _note(self, rejections: list[Rejection]) -> None:
        result = self.result
        result.rejected += len(rejections)
        room = MAX_REPORTED_REJECTIONS - len(result.rejections)
        result.rejections.extend(rejections[: max(room, 0)])
        if self._limited and result.rejected > self._max_rejected:
            raise InvalidArgument(
                ErrorReason.ERROR_REASON_INVALID_FIELD,
                f"more than {self._max_rejected} invalid entries; nothing was imported"
                if self._max_rejected
                else "invalid entries; nothing was imported",
                violations=[
                    FieldViolation(f"entries[{r.index}].{r.field}", r.description)
                    for r in result.rejections[:20]
                ],
            )

    async def _wait_for_writing(self) -> None:
        writing = self._writing
        if writing is not None:
            # Shielded: if the stream is cancelled now, the write must still end
            # cleanly (close() awaits it) rather than stop half-way.
            await asyncio.shield(writing)
            self._writing = None

    async def close(self) -> None:
        """Lets a write still running (the stream failed) end before the rollback.

        It is awaited, not cancelled: a statement cut off half-way can leave
        the connection unusable for the rollback (and SQLite locked).
        """
        writing, self._writing = self._writing, None
        if writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(writing)

    async def finish(self) -> ImportResult:
        """Completes the import; the caller then commits."""
        await self._wait_for_writing()
        self.result.imported, self.result.removed = await self._writer.finish(self._replace)
        return self.result


class _Aborted(Exception):
    """The stream failed or was cancelled: roll the import back."""


_END = object()
_ABORT = object()


class ImportRun:
    """An import in a task of its own, fed batch by batch by the stream.

    The stream's handler can be cancelled at any await; database work must
    not be (a statement cut off half-way can leave the connection unusable
    and SQLite locked). So the transaction lives in this task: a failed or
    cancelled stream tells it to roll back, and waits until it has.
    """

    def __init__(
        self,
        db: Database,
        store: BindingStore,
        digester: Digester,
        spec: ImportSpec,
        executor: Executor | None = None,
    ) -> None:
        self._db = db
        self._store = store
        # Two batches in flight at most: memory stays bounded for any stream.
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=2)
        self._task = asyncio.create_task(self._run(digester, spec, executor))

    async def add(self, entries: Sequence[RawEntry]) -> None:
        await self._put(entries)

    async def finish(self) -> ImportResult:
        await self._put(_END)
        return await asyncio.shield(self._task)

    async def abort(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_ABORT)
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._task)

    async def _put(self, item: object) -> None:
        """Queues an item, or raises what ended the import early (a bad partner...)."""
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            self._task.result()  # the import failed: raise its error
            raise AssertionError("import ended without a result")

    async def _run(
        self, digester: Digester, spec: ImportSpec, executor: Executor | None
    ) -> ImportResult:
        result = await self._import(digester, spec, executor)
        await self._store.refresh_list_statistics(result.imported + result.removed)
        return result

    async def _import(
        self, digester: Digester, spec: ImportSpec, executor: Executor | None
    ) -> ImportResult:
        async with self._db.transaction() as session:
            writer = self._store.list_import(session, spec.partner_id, digester.current)
            job = Import(writer, digester, spec, executor)
            try:
                await job.start()
                while True:
                    item = await self._queue.get()
                    if item is _END:
                        return await job.finish()
                    if item is _ABORT:
                        raise _Aborted
                    await job.add(item)  # type: ignore[arg-type]
            finally:
                await job.close()
