"""Worker processes that normalize bulk imports beside the server.

Phone number validation is pure Python and costs tens of microseconds per
number; in worker processes it runs on other cores while the server keeps
serving and PostgreSQL merges the previous batch.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor

from tether.server.binding.importer import prepare
from tether.server.shared.digests import DigestKey


class ImportWorkers:
    """A process pool of `count` workers, started on first use; none when count is 0."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._pool: ProcessPoolExecutor | None = None

    def get(self) -> Executor | None:
        if self._count <= 0:
            return None
        if self._pool is None:
            # spawn, not fork: forking a process that runs gRPC threads is unsafe.
            self._pool = ProcessPoolExecutor(
                self._count, mp_context=multiprocessing.get_context("spawn")
            )
        return self._pool

    async def warm_up(self) -> None:
        """Starts the workers now, so the first import does not wait for them."""
        pool = self.get()
        if pool is not None:
            key = DigestKey("warm-up", bytes(32))
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(
                    loop.run_in_executor(pool, prepare, key, 0, [("member_id", "x", "", "")])
                    for _ in range(self._count)
                )
            )

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)
