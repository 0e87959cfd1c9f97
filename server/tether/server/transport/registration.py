"""Services reach the server through generic handlers only.

The generated add_*_to_server functions hand every method to the server
twice: as a generic handler and as a "registered method". grpc.aio keeps one
pending request task per registered method and, for every call it accepts,
waits on all of them at once (asyncio.wait): with Tether's ~45 methods that
bookkeeping cost more per call than a whole Evaluate handler. Generic
handlers are served by one request task and a dictionary look-up per
service, so registration goes through GenericHandlersOnly, which passes the
generic handlers on and drops the (identical) registered ones.

The generic handlers reach the server behind one AuthenticatingHandler,
which authenticates every call (see transport/interceptor.py) and wraps it
in the metrics and tracing layers that are on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from tether.server.observability.handlers import ObservingLayer
from tether.server.transport.interceptor import AuthenticatingHandler, Authenticator


class GenericHandlersOnly(grpc.aio.Server):
    """The server as the areas register on it; everything else is delegated."""

    def __init__(
        self,
        server: grpc.aio.Server,
        authenticator: Authenticator,
        layers: Sequence[ObservingLayer] = (),
    ) -> None:
        self._server = server
        self._handler = AuthenticatingHandler(authenticator, layers)
        server.add_generic_rpc_handlers([self._handler])

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._handler.add(list(generic_rpc_handlers))

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        # The same handlers arrived through add_generic_rpc_handlers.
        return

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - grpc's signature
        return await self._server.wait_for_termination(timeout)
