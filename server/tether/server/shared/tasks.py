"""Background loops that end when they are cancelled, even when a library
lost the cancellation on the way."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raises CancelledError when the running task has been asked to stop.

    Python 3.11's asyncio.wait_for returns the awaited result, and drops a
    cancellation that arrives as that result comes in (fixed in 3.12).
    redis-py and fakeredis await every reply through it, and fakeredis
    answers at once: a loop cancelled during such a call went on, and the
    stop that awaited it waited for ever. A loop calls this after each such
    await (a task's cancel request stays counted until handled)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
