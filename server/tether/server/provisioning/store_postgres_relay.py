"""Live usage queries across the Tether processes of one PostgreSQL.

A device's usage question is answered by one of the partner's streams. When
no stream of the partner is connected to the process that received the
question, that process relays the query to a process holding one:

- Presence. A process holding at least one stream of a partner holds a
  shared session-level advisory lock named after the partner on its relay
  connection. PostgreSQL drops it with the connection, so a process that
  dies (or loses its connection) stops looking present at once: no
  heartbeat, no stale rows. `pg_locks` then tells the asker which backends
  (processes) hold a stream of the partner, or that none does, so a partner
  connected nowhere is known as such without waiting for the deadline.
- Query and answer. The asker sends the query with NOTIFY on
  `tether_usage_relay`, addressed to one holder's backend pid; the holder
  puts it on a stream of that partner (PartnerStreams.ask_usage) and sends the answer
  back the same way, addressed to the asker's process token. A holder whose
  last stream closed meanwhile answers "gone" and the asker tries the next
  holder. Payloads stay below NOTIFY's 8000-byte limit: an answer too large
  to relay comes back as a partner error.
- Isolation. A holder only ever forwards a query to a stream of the
  query's partner, the streams accept only that partner's answer to it, and the
  asker accepts an answer only for a query of the same id and partner.
- Failure. A holder that dies mid-query costs that query only: the asker
  stops waiting at the caller's deadline and answers with the last known
  figures, as for a partner that does not answer.

On SQLite (one embedded process) only the local streams exist
(store_sqlalchemy.LocalUsageRelay).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import secrets
import uuid
from collections import Counter
from datetime import datetime
from typing import Any

import asyncpg

from tether.server import logs
from tether.server.provisioning.store import AskHere
from tether.server.provisioning.usage_queries import UsageQueryOut, UsageReply
from tether.server.storage import listener

log = logs.get(__name__)

CHANNEL = "tether_usage_relay"
# First key of every presence lock ("TETH"); the second is the partner's hash.
LOCK_SPACE = 0x54455448
MAX_PAYLOAD = 7900
# How long a stream's opening waits for its presence to be registered: a
# partner that has its StreamReady is then reachable from every process.
OPEN_WAIT_SECONDS = 2.0
# How long start() waits for the relay connection before serving anyway.
START_WAIT_SECONDS = 10.0
# Time kept for the answer's way back from the holder to the asker.
RETURN_MARGIN_SECONDS = 0.05

_HOLDERS_SQL = """
SELECT DISTINCT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2
  AND classid = $1 AND objid = $2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND pid <> pg_backend_pid()
"""
_CONNECTION_ERRORS = listener.CONNECTION_ERRORS
_LOCK_SQL = "SELECT pg_try_advisory_lock_shared($1, k) FROM unnest($2::int[]) AS k"
_UNLOCK_SQL = "SELECT pg_advisory_unlock_shared($1, k) FROM unnest($2::int[]) AS k"


def presence_key(partner_id: str) -> int:
    """The partner's 31-bit lock key. Two partners sharing one only cost a
    "gone" round trip: the holder checks its streams by partner id."""
    digest = hashlib.blake2b(partner_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def _encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def _query_message(
    partner_id: str, query: UsageQueryOut, to: int, reply_to: str, wait: float
) -> dict[str, Any]:
    return {
        "k": "q",
        "to": to,
        "from": reply_to,
        "id": query.query_id,
        "p": partner_id,
        "b": str(query.binding_id),
        "s": query.service_id,
        "r": query.partner_reference,
        "d": query.deadline.isoformat(),
        "w": wait,
    }


def _answer_payload(to: str, query_id: str, partner_id: str, reply: UsageReply | None) -> str:
    """The answer message; "gone" when reply is None; a partner error when
    the figures do not fit in one NOTIFY."""
    message: dict[str, Any] = {"k": "a", "to": to, "id": query_id, "p": partner_id}
    if reply is None:
        message["gone"] = 1
        return _encode(message)
    full = _encode(
        {**message, "f": reply.figures, "per": reply.period[:100], "e": reply.error[:500]}
    )
    if len(full) <= MAX_PAYLOAD:
        return full
    message["e"] = f"the partner's answer ({len(full)} bytes) is too large to relay"
    return _encode(message)


def _reply_of(message: dict[str, Any]) -> UsageReply | None:
    if message.get("gone"):
        return None
    return UsageReply(
        [(str(m), int(q)) for m, q in message.get("f", [])],
        str(message.get("per", "")),
        str(message.get("e", "")),
    )


class PostgresUsageRelay:
    """Asks the partner on a local stream, else on another process's stream."""

    def __init__(self, database_url: str, ask_here: AskHere) -> None:
        self._url = database_url
        self._ask_here = ask_here
        # Answers are addressed to this token: it outlives reconnections.
        self._token = secrets.token_hex(8)
        self._conn: asyncpg.Connection | None = None
        self._conn_lock = asyncio.Lock()
        self._pid = 0
        self._lost: asyncio.Event | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        # Streams per partner connected here, and the presence locks held.
        self._local: Counter[str] = Counter()
        self._held: set[str] = set()
        # query_id -> (partner_id, future of the answer; None means "gone").
        self._pending: dict[str, tuple[str, asyncio.Future[UsageReply | None]]] = {}

    # --- lifecycle -----------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect_forever(), name="usage-relay")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT_SECONDS):
                await self._ready.wait()

    async def stop(self) -> None:
        """Closing the connection drops every presence lock at once."""
        self._stopped = True
        for task in [*self._tasks, *filter(None, [self._task])]:
            task.cancel()
        for task in [*self._tasks, *filter(None, [self._task])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)

    async def _connect_forever(self) -> None:
        await listener.listen_forever(
            listener.asyncpg_dsn(self._url),
            CHANNEL,
            self._on_notify,
            connected=self._connected,
            disconnected=self._disconnected,
            what="usage relay",
        )

    async def _connected(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        async with self._conn_lock:
            self._conn, self._pid, self._lost = conn, conn.get_server_pid(), lost
            self._held = set()
        await self._sync()
        self._ready.set()

    def _disconnected(self) -> None:
        self._ready.clear()
        self._conn = None

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- presence ------------------------------------------------------

    async def stream_opened(self, partner_id: str) -> None:
        """Registers a stream; returns once other processes can see it (or
        after OPEN_WAIT_SECONDS when PostgreSQL is out of reach)."""
        self._local[partner_id] += 1
        if self._stopped or partner_id in self._held:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OPEN_WAIT_SECONDS):
                await self._ready.wait()
                await self._sync()

    def stream_closed(self, partner_id: str) -> None:
        self._local[partner_id] -= 1
        if self._local[partner_id] <= 0:
            del self._local[partner_id]
            if not self._stopped:
                self._spawn(self._sync())

    async def _sync(self) -> None:
        """Makes the held presence locks match the partners with streams here."""
        async with self._conn_lock:
            conn = self._conn
            if conn is None:
                return
            wanted = set(self._local)
            take = sorted(wanted - self._held)
            drop = sorted(self._held - wanted)
            try:
                if take:
                    keys = [presence_key(p) for p in take]
                    taken = await conn.fetch(_LOCK_SQL, LOCK_SPACE, keys)
                    self._held |= {p for p, row in zip(take, taken, strict=True) if row[0]}
                if drop:
                    await conn.fetch(_UNLOCK_SQL, LOCK_SPACE, [presence_key(p) for p in drop])
                    self._held -= set(drop)
            except BaseException as exc:
                # Interrupted or failed halfway, the locks are in doubt: a new
                # connection starts from none and takes them all again.
                if not isinstance(exc, asyncio.CancelledError):
                    log.warning("usage relay presence failed; reconnecting", error=str(exc))
                conn.terminate()
                if self._lost is not None:
                    self._lost.set()
                if isinstance(exc, asyncio.CancelledError):
                    raise

    # --- asking --------------------------------------------------------

    async def ask_usage(
        self, partner_id: str, query: UsageQueryOut, wait_seconds: float
    ) -> UsageReply:
        """The partner's live answer, from a stream here or in another process.
        Raises LookupError when no process holds a stream of the partner,
        TimeoutError when no answer arrives within wait_seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_seconds
        try:
            return await self._ask_here(partner_id, query, wait_seconds)
        except LookupError:
            pass
        try:
            async with asyncio.timeout_at(until):
                holders = await self._holders(partner_id)
                random.shuffle(holders)
                for pid in holders:
                    reply = await self._ask_holder(pid, partner_id, query, until)
                    if reply is not None:
                        return reply
        except TimeoutError:
            raise  # an OSError too, but it means no answer in time
        except _CONNECTION_ERRORS as exc:
            # Other processes are out of reach: as good as not connected.
            log.warning("usage relay failed", error=str(exc))
        raise LookupError(partner_id)

    async def _ask_holder(
        self, pid: int, partner_id: str, query: UsageQueryOut, until: float
    ) -> UsageReply | None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[UsageReply | None] = loop.create_future()
        self._pending[query.query_id] = (partner_id, answer)
        try:
            wait = max(until - loop.time() - RETURN_MARGIN_SECONDS, 0.0)
            await self._send(_encode(_query_message(partner_id, query, pid, self._token, wait)))
            return await answer
        finally:
            self._pending.pop(query.query_id, None)

    async def _holders(self, partner_id: str) -> list[int]:
        """Backend pids of the other processes holding a stream of the partner."""
        async with self._conn_lock:
            if self._conn is None:
                return []
            rows = await self._conn.fetch(_HOLDERS_SQL, LOCK_SPACE, presence_key(partner_id))
        return [int(row[0]) for row in rows]

    async def _send(self, payload: str) -> None:
        async with self._conn_lock:
            if self._conn is None:
                raise LookupError("usage relay not connected")
            await self._conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    # --- receiving -----------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message.get("k") == "q" and message.get("to") == self._pid:
                query = UsageQueryOut(
                    query_id=str(message["id"]),
                    binding_id=uuid.UUID(str(message["b"])),
                    service_id=str(message["s"]),
                    partner_reference=str(message["r"]),
                    deadline=datetime.fromisoformat(str(message["d"])),
                )
                wait = float(message["w"])
                self._spawn(self._answer(str(message["from"]), str(message["p"]), query, wait))
            elif message.get("k") == "a" and message.get("to") == self._token:
                waiting = self._pending.get(str(message["id"]))
                # An answer only ever reaches a query of the same partner.
                if waiting and waiting[0] == message.get("p") and not waiting[1].done():
                    waiting[1].set_result(_reply_of(message))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("usage relay message ignored", error=str(exc))

    async def _answer(
        self, reply_to: str, partner_id: str, query: UsageQueryOut, wait: float
    ) -> None:
        """Puts a relayed query on a stream of its partner here and sends the
        answer back; nothing when the partner stays silent (the asker's own
        deadline ends its wait)."""
        reply: UsageReply | None
        try:
            reply = await self._ask_here(partner_id, query, wait)
        except LookupError:
            reply = None
        except TimeoutError:
            return
        with contextlib.suppress(LookupError, *_CONNECTION_ERRORS):
            await self._send(_answer_payload(reply_to, query.query_id, partner_id, reply))
