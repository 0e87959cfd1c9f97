"""The server as stock gRPC tools see it: health checking and reflection."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import RunningServer


async def test_health_reports_every_service_serving_without_a_token(
    pg_server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(pg_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tether.admin.v1.Admin", *pg_server.app_services()):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_every_service_without_a_token(pg_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(pg_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names: set[str] = set()
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names.update(s.name for s in reply.list_services_response.service)
    assert {"tether.admin.v1.Admin", "grpc.health.v1.Health", *pg_server.app_services()} <= names


async def test_reflection_describes_every_service_so_stock_tools_can_call_it(
    pg_server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(pg_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        for service in ("tether.admin.v1.Admin", *pg_server.app_services()):
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
            async for reply in stub.ServerReflectionInfo(iter([request])):
                assert reply.WhichOneof("message_response") == "file_descriptor_response", service
                files = [
                    descriptor_pb2.FileDescriptorProto.FromString(raw)
                    for raw in reply.file_descriptor_response.file_descriptor_proto
                ]
                described = {f"{f.package}.{s.name}" for f in files for s in f.service}
                assert service in described
