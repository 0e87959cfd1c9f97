"""The fuzzer's parts: every RPC from the service descriptors, hypothesis
strategies for request bodies (generated messages, mutated encodings, raw
bytes), a generic channel call, and a snapshot of what storage holds."""

from __future__ import annotations

import asyncio
import importlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import redis.asyncio as redis
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from sqlalchemy import text

from tether.server.binding.rate_limit import window_key
from tether.server.storage.database import Database

AREAS = ("admin", "binding", "provisioning", "guard")
# What grpc's client says of its own failed write (never sent by the server).
CLIENT_WRITE_FAILED = "Internal error from Core"


@dataclass(frozen=True)
class Rpc:
    path: str
    request: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def rpcs() -> list[Rpc]:
    """Every method of every Tether service, from its descriptor."""
    found = []
    for area in AREAS:
        module = importlib.import_module(f"tether.{area}.v1.service_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append(
                    Rpc(
                        f"/{service.full_name}/{method.name}",
                        message_factory.GetMessageClass(method.input_type),
                        method.client_streaming,
                        method.server_streaming,
                    )
                )
    return found


@dataclass
class Pools:
    """Values that reach past format checks into real look-ups."""

    strings: list[str] = field(default_factory=list)
    # Well-formed requests by RPC path: a fuzzed body may start from one and
    # change some fields, to get past the checks into the domain.
    templates: dict[str, list[Message]] = field(default_factory=dict)

    def add(self, *values: str) -> None:
        self.strings.extend(values)

    def template(self, path: str, *requests: Message) -> None:
        self.templates.setdefault(path, []).extend(requests)


NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "p\x00x",
    "cred_\x00",
    "00000000-0000-0000-0000-000000000000",
    str(uuid.uuid4()),
    "' OR 1=1 --",
    "%",
    "_",
    "*",
    "a" * 64,
    "a" * 65,
    "x" * 5000,
    "\u202e\u0301\U0001f600",
    "\ud7ff\ue000",
    "+491510000000",
    "+1",
    "490154203237518",
    "abc\n",
    "tether:guard:*",
    "{a}",
    "gi-0123456789abcdef0123456789abcdef",
    "0123456789abcdef0123456789abcdef",
]
BOUNDARY_INTS = [
    0,
    1,
    -1,
    2,
    5,
    100,
    1000,
    1001,
    2**31 - 1,
    -(2**31),
    2**40,
    -(2**40),
    2**63 - 1,
    -(2**63),
    253_402_300_800,
    -62_135_596_801,
    999_999_999,
    1_000_000_000,
]
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def _ints(kind: int) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[kind]
    edges = [i for i in BOUNDARY_INTS if low <= i <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(-3, 30))


def _strings(pools: Pools) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(pools.strings or [""]),
        st.sampled_from(NASTY_STRINGS),
        st.text(max_size=40),
        st.from_regex(r"[a-z][a-z0-9-]{2,20}", fullmatch=True),
    )


def _scalar(f: Any, pools: Pools) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_STRING:
        return _strings(pools)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type in _FLOATS:
        return st.floats(width=32 if f.type == FieldDescriptor.TYPE_FLOAT else 64)
    if f.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(f.type))
    return _ints(f.type)


_MESSAGES: dict[tuple[int, str, int], st.SearchStrategy[Message]] = {}


def messages(descriptor: Any, pools: Pools, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type with any subset of fields set, to any value."""
    key = (id(pools), descriptor.full_name, depth)
    if key not in _MESSAGES:
        _MESSAGES[key] = _messages(descriptor, pools, depth)
    return _MESSAGES[key]


def _messages(descriptor: Any, pools: Pools, depth: int) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 4:
        return st.just(cls())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        fields = list(descriptor.fields)
        chosen = draw(st.lists(st.sampled_from(fields), max_size=len(fields), unique=True))
        f: Any
        for f in chosen if fields else []:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                if f.message_type.GetOptions().map_entry:
                    key_f = f.message_type.fields_by_name["key"]
                    value_f = f.message_type.fields_by_name["value"]
                    entries = draw(
                        st.dictionaries(_scalar(key_f, pools), _scalar(value_f, pools), max_size=3)
                    )
                    for key, value in entries.items():
                        getattr(message, f.name)[key] = value
                    continue
                sub = messages(f.message_type, pools, depth + 1)
                if f.is_repeated:
                    for item in draw(st.lists(sub, max_size=3)):
                        getattr(message, f.name).add().CopyFrom(item)
                else:
                    getattr(message, f.name).CopyFrom(draw(sub))
            elif f.is_repeated:
                getattr(message, f.name).extend(draw(st.lists(_scalar(f, pools), max_size=3)))
            else:
                setattr(message, f.name, draw(_scalar(f, pools)))
        return message

    return build()


@st.composite
def _templated(
    draw: st.DrawFn, templates: list[Message], changes: st.SearchStrategy[Message]
) -> Message:
    """A well-formed request with some of its fields set to generated values."""
    message = draw(st.sampled_from(templates)).__deepcopy__()
    if draw(st.integers(0, 3)) == 0:
        return message
    change = draw(changes)
    field: Any
    for field, _ in change.ListFields():
        if draw(st.integers(0, 3)) == 0:
            message.ClearField(field.name)
            if field.is_repeated:
                getattr(message, field.name).MergeFrom(getattr(change, field.name))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(getattr(change, field.name))
            else:
                setattr(message, field.name, getattr(change, field.name))
    return message


@st.composite
def _mutated(draw: st.DrawFn, encoded: bytes) -> bytes:
    data = bytearray(encoded)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if action == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


def body(rpc: Rpc, pools: Pools) -> st.SearchStrategy[tuple[str, bytes]]:
    """One request body and how it was made: a generated message, a
    generated message with its encoding mutated, or raw bytes."""
    generated = messages(rpc.request.DESCRIPTOR, pools)
    templates = pools.templates.get(rpc.path)
    if templates:
        templated = _templated(templates, generated)
        generated = st.one_of(generated, templated, templated)
    return st.one_of(
        generated.map(lambda m: ("generated", m.SerializeToString())),
        generated.flatmap(lambda m: _mutated(m.SerializeToString())).map(lambda b: ("mutated", b)),
        st.one_of(st.sampled_from([b"\xff", b"\x0a\xff", b"\x08"]), st.binary(max_size=64)).map(
            lambda b: ("raw", b)
        ),
    )


_BODIES: dict[tuple[int, str], st.SearchStrategy[list[tuple[str, bytes]]]] = {}


def bodies(rpc: Rpc, pools: Pools) -> st.SearchStrategy[list[tuple[str, bytes]]]:
    """The messages of a call: one, or 1-4 on a client stream."""
    key = (id(pools), rpc.path)
    if key not in _BODIES:
        _BODIES[key] = st.lists(
            body(rpc, pools), min_size=1, max_size=4 if rpc.client_streaming else 1
        )
    return _BODIES[key]


async def call(
    channel: grpc.aio.Channel, rpc: Rpc, requests: Sequence[bytes], token: str, seconds: float
) -> tuple[grpc.StatusCode, str]:
    """Sends raw bodies through a generic call (identity serializers); the
    status and its message."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    generic: Any = channel
    if not rpc.client_streaming:
        try:
            if rpc.server_streaming:
                responses = generic.unary_stream(rpc.path)(
                    requests[0], metadata=metadata, timeout=seconds
                )
                async for _ in responses:
                    pass
            else:
                await generic.unary_unary(rpc.path)(requests[0], metadata=metadata, timeout=seconds)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""
    # Written one by one: a write after the server ended the call fails on
    # this side (grpc reports it as INTERNAL), which is not the server's answer.
    streaming: Any = (
        generic.stream_stream(rpc.path) if rpc.server_streaming else generic.stream_unary(rpc.path)
    )
    client_call = streaming(metadata=metadata, timeout=seconds)
    try:
        for request in requests:
            if client_call.done():
                break
            await client_call.write(request)
        await client_call.done_writing()
    except Exception:  # the write lost a race with the server's answer, read below
        pass
    try:
        if rpc.server_streaming:
            async for _ in client_call:
                pass
        else:
            await client_call
    except grpc.aio.AioRpcError:
        pass
    code, details = await client_call.code(), await client_call.details() or ""
    if code == grpc.StatusCode.INTERNAL and details == CLIENT_WRITE_FAILED:
        # The server ended the call while this side still wrote: grpc marks
        # the call INTERNAL here and the server's own status is lost.
        return grpc.StatusCode.CANCELLED, details
    return code, details


@dataclass(frozen=True)
class Snapshot:
    rows: dict[str, int]
    keys: frozenset[bytes | str]

    def written_since(self, before: Snapshot) -> list[str]:
        """Tables with more rows and keys that are new: what a call wrote."""
        grown = [
            f"{table}: {before.rows.get(table, 0)} -> {count} rows"
            for table, count in self.rows.items()
            if count > before.rows.get(table, 0)
        ]
        return grown + [f"new key {key!r}" for key in sorted(self.keys - before.keys)]


# The report rate limiter's window keys (binding/rate_limit.py).
RATE_KEYS = window_key("", "", 0).split("{", 1)[0].encode()


class Storage:
    """Row counts of every table and the set of Redis keys, read at once."""

    def __init__(self, db: Database, redis_url: str) -> None:
        self._db = db
        self._redis = redis.Redis.from_url(redis_url)
        self._query: str | None = None

    async def snapshot(self) -> Snapshot:
        async with self._db.sessions() as session:
            if self._query is None:
                tables = (
                    await session.execute(
                        text(
                            "SELECT table_name FROM information_schema.tables "
                            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' "
                            "AND table_name <> 'alembic_version' ORDER BY table_name"
                        )
                    )
                ).scalars()
                self._query = "SELECT " + ", ".join(
                    f'(SELECT count(*) FROM "{t}") AS "{t}"' for t in tables
                )
            row = (await session.execute(text(self._query))).mappings().one()
        # Report rate windows count every attempt, refused ones too (that is
        # what stops probing account after account): a refusal opening a
        # new minute's window is no write of its own.
        # Bytes (the client does not decode).
        stored = cast(list[bytes], await self._redis.keys("*"))
        keys = frozenset(k for k in stored if not k.startswith(RATE_KEYS))
        return Snapshot(dict(row), keys)

    async def settled(self, within: float = 2.0) -> Snapshot:
        """A snapshot once background work (outbox, recorder) has stopped writing."""
        previous = await self.snapshot()
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.03)
            current = await self.snapshot()
            if current == previous:
                return current
            previous = current
        return previous

    async def close(self) -> None:
        await self._redis.aclose()
