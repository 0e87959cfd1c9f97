"""The admin area's wiring: its servicer, nothing in the background."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tether.admin.v1 import service_pb2_grpc
from tether.server.admin.servicer import SERVICE_NAME, AdminServicer
from tether.server.components import Component
from tether.server.runtime import Runtime


@dataclass(kw_only=True)
class AdminArea(Component):
    pass


def build(server: grpc.aio.Server, runtime: Runtime) -> AdminArea:
    service_pb2_grpc.add_AdminServicer_to_server(AdminServicer(runtime), server)
    return AdminArea(services=[SERVICE_NAME])
