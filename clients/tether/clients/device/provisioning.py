"""The device's side of provisioning: watch entitlements, check one, report
and ask for usage."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import datetime

import grpc

from tether.common.v1 import types_pb2 as types
from tether.provisioning.v1 import messages_pb2 as pb
from tether.provisioning.v1.service_pb2_grpc import ProvisioningStub


class DeviceProvisioning:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = ProvisioningStub(channel)

    async def watch(
        self, device: types.Device, after_position: int = 0
    ) -> AsyncIterator[pb.EntitlementEvent]:
        """Every entitlement change of the device after the position, then live ones.

        Keep the last event's position: pass it to resume after a disconnect.
        """
        call = self.stub.WatchEntitlements(
            pb.WatchEntitlementsRequest(device=device, after_position=after_position)
        )
        try:
            async for response in call:
                yield response.event
        finally:
            call.cancel()

    async def check(
        self, device: types.Device, account: types.Account, partner_id: str, service_id: str
    ) -> pb.CheckEntitlementResponse:
        return await self.stub.CheckEntitlement(
            pb.CheckEntitlementRequest(
                device=device, account=account, partner_id=partner_id, service_id=service_id
            )
        )

    async def usage(
        self,
        device: types.Device,
        binding_id: str,
        service_id: str,
        timeout: float | None = 5.0,  # noqa: ASYNC109 (a gRPC deadline, passed on)
    ) -> pb.QueryDeviceUsageResponse:
        """Asks the partner live; falls back to last known figures (see source)."""
        return await self.stub.QueryDeviceUsage(
            pb.QueryDeviceUsageRequest(device=device, binding_id=binding_id, service_id=service_id),
            timeout=timeout,
        )

    async def report_usage(
        self,
        device: types.Device,
        binding_id: str,
        service_id: str,
        events: list[tuple[datetime, str, int]],
    ) -> int:
        """Records (occur_time, metric, quantity) events; returns how many."""
        report = pb.UsageReport(binding_id=binding_id, service_id=service_id)
        for occur_time, metric, quantity in events:
            event = report.events.add()
            event.occur_time.FromDatetime(occur_time)
            event.figure.metric = metric
            event.figure.quantity = quantity
        response = await self.stub.ReportUsage(
            pb.ReportUsageRequest(request_id=secrets.token_hex(8), device=device, report=report)
        )
        return response.recorded_count
