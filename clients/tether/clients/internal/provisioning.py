"""Internal services' side of provisioning: usage queries, the pipeline,
replay of dead instructions."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime

import grpc

from tether.clients.paging import every, pages
from tether.common.v1 import types_pb2 as types
from tether.provisioning.v1 import messages_pb2 as pb
from tether.provisioning.v1.service_pb2_grpc import ProvisioningStub


class InternalProvisioning:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = ProvisioningStub(channel)

    def usage(
        self,
        start: datetime,
        end: datetime,
        *,
        partner_id: str = "",
        service_id: str = "",
        device: types.Device | None = None,
        account: types.Account | None = None,
        binding_id: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[pb.QueryUsageResponse]:
        """The pages of a usage query (each carries the totals)."""
        request = pb.QueryUsageRequest(
            partner_id=partner_id,
            service_id=service_id,
            device=device,
            account=account,
            binding_id=binding_id,
            page_size=page_size,
        )
        request.start_time.FromDatetime(start)
        request.end_time.FromDatetime(end)

        def fetch(token: str) -> Awaitable[pb.QueryUsageResponse]:
            request.page_token = token
            return self.stub.QueryUsage(request)

        return pages(fetch)

    async def pipeline(self, partner_id: str = "") -> pb.GetPipelineResponse:
        return await self.stub.GetPipeline(pb.GetPipelineRequest(partner_id=partner_id))

    def instructions(
        self,
        partner_id: str,
        state: pb.InstructionState.ValueType = pb.INSTRUCTION_STATE_UNSPECIFIED,
    ) -> AsyncIterator[pb.InstructionRecord]:
        return every(
            lambda token: self.stub.ListInstructions(
                pb.ListInstructionsRequest(
                    partner_id=partner_id, state=state, page_size=500, page_token=token
                )
            ),
            lambda page: page.instructions,
        )

    async def replay(self, instruction_id: str) -> pb.InstructionRecord:
        response = await self.stub.ReplayInstruction(
            pb.ReplayInstructionRequest(
                request_id=secrets.token_hex(8), instruction_id=instruction_id
            )
        )
        return response.instruction
