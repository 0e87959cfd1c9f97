"""The binding area's wiring: its servicer, its import workers, and the
hooks it offers other areas (app.py passes them on)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tether.binding.v1 import service_pb2_grpc
from tether.server.binding import bindings
from tether.server.binding.changes import BindingChanges
from tether.server.binding.import_workers import ImportWorkers
from tether.server.binding.servicer import SERVICE_NAME, BindingServicer
from tether.server.binding.store import BindingStore
from tether.server.components import Component
from tether.server.runtime import Runtime
from tether.server.shared.bindings import BindingReader


@dataclass(kw_only=True)
class BindingArea(Component):
    # Told of every binding created or revoked, inside its transaction.
    changes: BindingChanges
    # Reads a binding for another area.
    bindings: BindingReader


def build(server: grpc.aio.Server, runtime: Runtime, store: BindingStore) -> BindingArea:
    changes = BindingChanges()
    workers = ImportWorkers(runtime.settings.import_workers)
    service_pb2_grpc.add_BindingServicer_to_server(
        BindingServicer(runtime, store, changes, workers), server
    )
    return BindingArea(
        services=[SERVICE_NAME],
        start=workers.warm_up,
        stop=workers.stop,
        changes=changes,
        bindings=bindings.find,
    )
