"""The guard area's wiring: the Guard, its servicer, and the web side."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tether.guard.v1 import service_pb2_grpc
from tether.server.components import Component
from tether.server.guard.book_follower import BookFollower
from tether.server.guard.restorer import Restorer
from tether.server.guard.service import Guard
from tether.server.guard.servicer import SERVICE_NAME, GuardServicer
from tether.server.guard.store import GuardStore
from tether.server.guard.web import WebSide
from tether.server.runtime import Runtime


@dataclass(kw_only=True)
class GuardArea(Component):
    guard: Guard
    web: WebSide
    restorer: Restorer
    follower: BookFollower


def build(server: grpc.aio.Server, runtime: Runtime, store: GuardStore) -> GuardArea:
    guard = Guard(runtime, store)
    service_pb2_grpc.add_FingerprintGuardServicer_to_server(GuardServicer(runtime, guard), server)
    web = WebSide(runtime.settings, guard)
    restorer = Restorer(guard)
    follower = BookFollower(guard)

    async def start() -> None:
        await guard.load()
        follower.start()
        guard.recorder.start()
        await restorer.start()
        # After the restorer: a new connection finds the markers it sets.
        await guard.warm()
        await web.start()

    async def stop() -> None:
        await web.stop()
        await follower.stop()
        await restorer.stop()
        await guard.recorder.stop()
        guard.counters.close()

    return GuardArea(
        services=[SERVICE_NAME],
        start=start,
        stop=stop,
        guard=guard,
        web=web,
        restorer=restorer,
        follower=follower,
    )
