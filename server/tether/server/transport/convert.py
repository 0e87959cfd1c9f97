"""Small conversions between domain values and protobuf fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(value: datetime | None) -> Timestamp | None:
    """Same value as Timestamp.FromDatetime (naive means UTC), in integer
    arithmetic at a third of its cost: it runs on hot paths."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    seconds, micros = divmod((value - _EPOCH) // _MICROSECOND, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def timestamp_of_ms(ms: int) -> Timestamp | None:
    """Unix milliseconds (0: none) as a Timestamp, without a datetime between."""
    if not ms:
        return None
    seconds, millis = divmod(ms, 1000)
    return Timestamp(seconds=seconds, nanos=millis * 1_000_000)
