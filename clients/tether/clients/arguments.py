"""argparse types for the numbers and days commands send: a value a proto
field cannot hold, or no number at all, is a usage error naming its flag
(exit 2), never a ValueError from protobuf or a timeout from the server."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# ASCII digits only: int() also reads other scripts' digits ("١٢").
_WHOLE = re.compile(r"[0-9]{1,19}")


def whole(high: int = INT32_MAX, *, low: int = 0) -> Callable[[str], int]:
    """A whole number from low to high."""

    def parse(text: str) -> int:
        if _WHOLE.fullmatch(text) and low <= int(text) <= high:
            return int(text)
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a whole number from {low:,} to {high:,}"
        )

    return parse


def is_whole(text: str, high: int = INT64_MAX) -> bool:
    """Whether text is a whole number from 0 to high (ASCII digits)."""
    return bool(_WHOLE.fullmatch(text)) and int(text) <= high


def seconds(*, zero: bool = False) -> Callable[[str], float]:
    """A finite number of seconds, more than 0 (or 0 too, with zero)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and (value > 0 or (zero and value == 0)):
            return value
        at_least = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds, {at_least}")

    return parse


# Days a command reckons ranges around (30 days before one, a day after):
# a year from either end of what a datetime holds.
_FIRST_DAY = datetime(2, 1, 1, tzinfo=UTC)
_LAST_DAY = datetime(9998, 12, 31, tzinfo=UTC)


def day(text: str) -> datetime:
    """A day (YYYY-MM-DD), as its midnight UTC."""
    try:
        value = datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        value = None
    if value is None or not _FIRST_DAY <= value <= _LAST_DAY:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a day: YYYY-MM-DD, from 0002-01-01 to 9998-12-31"
        )
    return value
