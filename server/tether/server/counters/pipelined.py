"""One Redis connection that many concurrent script calls share.

Each call writes its command and awaits its own reply; Redis answers in
order, so replies are matched to calls first in, first out. This is the hot
path's way to Redis: redis-py's client takes a pooled connection per command
(two lock round trips, observability hooks, a retry wrapper), which cost
more per call than the script itself. The rest (rare calls, embedded mode's
fakeredis, TLS and Unix sockets) keeps using redis-py.

Every call is bounded in time by the connection (timeout_seconds), with one
timer for all of them rather than an asyncio.timeout per call (a Timeout
object, a timer handle made and cancelled, and a cancellation scope per
call, on the hot path of every call). The timer is armed at the oldest
waiting call's deadline and, when it fires, re-armed at the next one's, so
it is set a few times a second, not per call. A call whose bound passes
drops the connection: a Redis that does not answer in time, or a network
that went silent, leaves it in doubt, so every call waiting on it fails
(ConnectionError) and the next call connects again. A cancelled call's
reply is read and discarded when it comes, and its deadline no longer
counts, so one caller giving up (a client's deadline) disturbs no other.
Connecting (rare) is bounded by the same deadline with asyncio.timeout_at.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import parse_url

# hiredis's stub types the command as a 1-tuple; it takes any length.
_pack = cast(Callable[[tuple[str | bytes | int, ...]], bytes], hiredis.pack_command)


class Script:
    """A Lua script and its SHA1, as EVALSHA names it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        # SHA1 is what Redis names scripts by; no security rests on it.
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


TIMED_OUT = "no answer within the time bound"
# Commands queued in one turn of the loop go out when this many are (a
# caller sending hundreds without yielding, a backtest, keeps Redis busy
# meanwhile) or at the turn's end.
WRITE_AT = 32
_ASKING = _pack(("ASKING",))


class _Replies(asyncio.Protocol):
    """The socket's side: parses replies and hands each to the oldest waiting call."""

    def __init__(self) -> None:
        # Error replies come back as values (ResponseError), not raised.
        self._reader = hiredis.Reader(replyError=redis_errors.ResponseError)
        self._loop = asyncio.get_running_loop()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        # Each waiting call's deadline (loop time), in the same order.
        self._deadlines: deque[float] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        # Commands sent in one turn of the loop while others are in flight
        # go out in one write.
        self._outgoing: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                waiter = self.waiting.popleft()
                self._deadlines.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError):
            self.close("unreadable reply from Redis")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            "connection to Redis lost" if exc is None else f"connection to Redis lost: {exc}"
        )

    def send(self, command: bytes, deadline: float) -> asyncio.Future[Any]:
        """The future of command's reply, failed if no reply came by deadline
        (loop time). The write and the queueing happen together (no await
        between), which keeps replies in step."""
        if self.closed:
            raise redis_errors.ConnectionError("connection to Redis closed")
        assert self._transport is not None
        waiter = self._loop.create_future()
        if not self.waiting:
            # A lone call (nothing in flight, so nothing queued to write
            # either) goes out at once: calls that come one by one reach
            # Redis a turn of the loop sooner.
            self._transport.write(command)
        else:
            if not self._outgoing:
                self._loop.call_soon(self._write)
            self._outgoing.append(command)
            if len(self._outgoing) >= WRITE_AT:
                self._write()
        self.waiting.append(waiter)
        self._deadlines.append(deadline)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)
        return waiter

    def _write(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if not self.closed and self._transport is not None:
            self._transport.write(b"".join(outgoing))

    def _expire(self) -> None:
        """The timer: drops the connection if the oldest call still waited
        for (not given up) is past its deadline, else waits for that one's."""
        self._timer = None
        for waiter, deadline in zip(self.waiting, self._deadlines, strict=True):
            if waiter.done():
                continue  # given up: its deadline no longer counts
            if deadline <= self._loop.time():
                self.close(TIMED_OUT)
            else:
                self._timer = self._loop.call_at(deadline, self._expire)
            return

    def close(self, why: str) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(why)

    def _fail(self, why: str) -> None:
        self.closed = True
        self._outgoing.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(redis_errors.ConnectionError(why))


class PipelinedConnection:
    def __init__(
        self,
        host: str,
        port: int,
        timeout_seconds: float,
        *,
        db: int = 0,
        username: str = "",
        password: str = "",
    ) -> None:
        """timeout_seconds bounds every call, connecting included."""
        self._address = (host, port)
        self._timeout = timeout_seconds
        # Sent ahead of the first command of every connection.
        setup: list[tuple[str | bytes | int, ...]] = []
        if password:
            setup.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            setup.append(("SELECT", db))
        self._setup = [_pack(command) for command in setup]
        self._replies: _Replies | None = None
        self._opening = asyncio.Lock()
        # Run on every new connection before any call goes through it (a
        # restarted Redis means a new connection); given a way to send a
        # command on it. Raising fails the calls that waited for it.
        self.on_open: Callable[[Callable[..., Awaitable[Any]]], Awaitable[None]] | None = None

    @classmethod
    def from_url(cls, url: str, timeout_seconds: float) -> PipelinedConnection | None:
        """None for what this connection does not speak (TLS, Unix sockets,
        no URL: the embedded fakeredis); those callers keep redis-py."""
        if not url:
            return None
        options = parse_url(url)
        if "connection_class" in options or "host" not in options:
            return None
        return cls(
            options["host"],
            int(options.get("port", 6379)),
            timeout_seconds,
            db=int(options.get("db", 0)),
            username=options.get("username") or "",
            password=options.get("password") or "",
        )

    async def run_script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[bytes | int | str],
        *,
        deadline: float | None = None,
        asking: bool = False,
    ) -> Any:
        """The script's reply; loads the script when Redis does not know it.
        Raises ConnectionError (or TimeoutError while connecting) when Redis
        does not answer within the time bound, or by `deadline` (loop time)
        when given. asking: preceded by ASKING (a cluster's slot being migrated
        here)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._timeout
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        reply = await self._call(command, deadline, asking)
        if isinstance(reply, redis_errors.ResponseError):
            if str(reply).startswith("NOSCRIPT"):
                # EVAL runs it and caches it for the next EVALSHA (within the same bound).
                command = ("EVAL", script.source, len(keys), *keys, *args)
                reply = await self._call(command, deadline, asking)
            if isinstance(reply, redis_errors.ResponseError):
                raise _raised(reply)
        return reply

    def send_script(
        self, script: Script, keys: Sequence[str], args: Sequence[bytes | int | str]
    ) -> asyncio.Future[Any] | None:
        """Sends the script at once and returns its reply's future (an error
        reply, NOSCRIPT too, comes as a value), within the time bound; None
        when no connection is open (then run_script). For a caller that has
        many calls in flight in order (a backtest) and would otherwise start
        a task for each."""
        replies = self._replies
        if replies is None or replies.closed:
            return None
        deadline = asyncio.get_running_loop().time() + self._timeout
        return replies.send(_pack(("EVALSHA", script.sha, len(keys), *keys, *args)), deadline)

    async def command(self, *args: str | bytes | int) -> Any:
        """Any command on this connection, within the time bound (e.g.
        SCRIPT LOAD before scripts are sent many at a time)."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        reply = await self._call(args, deadline)
        if isinstance(reply, redis_errors.ResponseError):
            raise _raised(reply)
        return reply

    async def _call(
        self, command: tuple[str | bytes | int, ...], deadline: float, asking: bool = False
    ) -> Any:
        replies = self._replies
        if replies is None or replies.closed:
            async with asyncio.timeout_at(deadline):
                replies = await self._open(deadline)
        if asking:
            # ASKING holds for the next command on this connection only: both
            # are queued in one go, so no other call's command comes between.
            asked, reply = await asyncio.gather(
                replies.send(_ASKING, deadline), replies.send(_pack(command), deadline)
            )
            if isinstance(asked, redis_errors.ResponseError):
                return asked
            return reply
        return await replies.send(_pack(command), deadline)

    async def _open(self, deadline: float) -> _Replies:
        async with self._opening:
            replies = self._replies
            if replies is not None and not replies.closed:
                return replies  # another call opened it meanwhile
            _, replies = await asyncio.get_running_loop().create_connection(
                _Replies, *self._address
            )
            try:
                for command in self._setup:
                    _check_setup(await replies.send(command, deadline))
                if self.on_open is not None:
                    opened = replies

                    async def send(*args: str | bytes | int) -> Any:
                        return await opened.send(_pack(args), deadline)

                    await self.on_open(send)
            except BaseException:
                replies.close("setup failed")
                raise
            self._replies = replies
            return replies

    @property
    def waiting(self) -> int:
        """Calls sent and not yet answered (or given up)."""
        return 0 if self._replies is None else len(self._replies.waiting)

    def close(self) -> None:
        """Closes the connection, failing the calls that wait on it; a later
        call opens a new one."""
        if self._replies is not None:
            self._replies.close("closed")
            self._replies = None


def _check_setup(reply: Any) -> None:
    if isinstance(reply, redis_errors.ResponseError):
        # A wrong password or database: redis-py also calls it a connection error.
        raise redis_errors.AuthenticationError(str(reply))


def _raised(reply: redis_errors.ResponseError) -> redis_errors.RedisError:
    """The exception redis-py would raise for an error reply."""
    if str(reply).startswith("LOADING"):
        return redis_errors.BusyLoadingError(str(reply))
    return reply
