"""The server as stock gRPC tools see it: health checking, reflection, and
authentication in front of every method."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool as pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import RunningServer

# Calls by path with raw bytes: no stubs needed to reach every method.
RawUnary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
RawStream = grpc.aio.StreamStreamMultiCallable[bytes, bytes]


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


async def test_every_method_of_every_service_demands_a_credential(
    pg_server: RunningServer,
) -> None:
    async with grpc.aio.insecure_channel(pg_server.address) as channel:
        for service in ("tether.admin.v1.Admin", *pg_server.app_services()):
            descriptor = pool.Default().FindServiceByName(service)
            for method in descriptor.methods:
                path = f"/{service}/{method.name}"
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    # An empty message: authentication comes before any field.
                    if method.server_streaming or method.client_streaming:
                        stream: RawStream = channel.stream_stream(path)
                        async for _ in stream(iter([b""])):
                            pass
                    else:
                        unary: RawUnary = channel.unary_unary(path)
                        await unary(b"")
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.full_name


async def test_an_unknown_method_is_unimplemented(pg_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(pg_server.address) as channel:
        call: RawUnary = channel.unary_unary("/tether.guard.v1.FingerprintGuard/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(b"")
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
