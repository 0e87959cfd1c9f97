"""gRPC face of this area: not built yet, so nothing is registered."""

from __future__ import annotations

import grpc

from tether.server.components import Component
from tether.server.runtime import Runtime


def register(server: grpc.aio.Server, runtime: Runtime) -> Component:
    return Component(services=[])
