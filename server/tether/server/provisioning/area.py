"""The provisioning area's wiring: wake-ups, the partner streams, the usage
relay, the outbox it hangs on binding's change hook, and its servicer."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tether.provisioning.v1 import service_pb2_grpc
from tether.server.components import Component
from tether.server.provisioning.leasing import Timing
from tether.server.provisioning.servicer import SERVICE_NAME, ProvisioningServicer
from tether.server.provisioning.store import ProvisioningStore, UsageRelay
from tether.server.provisioning.stream_protocol import StreamProtocol
from tether.server.provisioning.streams import PartnerStreams
from tether.server.provisioning.usage_queries import UsageQueries
from tether.server.provisioning.wakeup import Wakeup
from tether.server.runtime import Runtime
from tether.server.shared.bindings import BindingListener, BindingReader


@dataclass(kw_only=True)
class ProvisioningArea(Component):
    wakeup: Wakeup
    streams: PartnerStreams
    relay: UsageRelay
    # Hung on the binding area's change hook by app.py.
    outbox: BindingListener


def build(
    server: grpc.aio.Server,
    runtime: Runtime,
    store: ProvisioningStore,
    *,
    bindings: BindingReader,
) -> ProvisioningArea:
    """bindings: the binding area's reader (app.py passes it)."""
    settings = runtime.settings
    timing = Timing.of(settings)
    wakeup = Wakeup(store.broadcast())
    streams = PartnerStreams(
        runtime.db, wakeup, store.delivery(wakeup, timing), settings.provisioning_poll_seconds
    )
    relay = store.usage_relay(streams.ask_usage)
    protocol = StreamProtocol(
        runtime.db,
        streams,
        relay,
        bindings,
        max_in_flight=settings.provisioning_max_in_flight,
        ack_deadline=timing.lease_for(1),
    )
    usage_queries = UsageQueries(runtime.db, relay, bindings)
    service_pb2_grpc.add_ProvisioningServicer_to_server(
        ProvisioningServicer(
            runtime,
            notify=wakeup,
            streams=streams,
            protocol=protocol,
            usage_queries=usage_queries,
            bindings=bindings,
        ),
        server,
    )

    async def start() -> None:
        await wakeup.start()
        await relay.start()

    async def stop() -> None:
        wakeup.close_waiters()
        # First: this process's presence goes at once, so other processes
        # stop relaying usage queries to streams about to end.
        await relay.stop()
        await streams.shutdown()
        await wakeup.stop()

    return ProvisioningArea(
        services=[SERVICE_NAME],
        start=start,
        stop=stop,
        wakeup=wakeup,
        streams=streams,
        relay=relay,
        outbox=store.outbox(wakeup),
    )
