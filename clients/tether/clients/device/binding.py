"""Binding for device callers: the library and the tether-device commands
`report`, `bindings` and `unbind`.

A device OS service calls `report` when an account comes into use on the
device (a new SIM card, a sign-in), so that partners whose lists hold the
account can open their services on it.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1.service_pb2_grpc import BindingStub
from tether.clients import accounts
from tether.clients.cli import print_message
from tether.clients.paging import every
from tether.common.v1 import types_pb2 as types


class DeviceBinding:
    """The binding calls of one device, named by its terminal id."""

    def __init__(self, channel: grpc.aio.Channel, device: types.Device) -> None:
        self._stub = BindingStub(channel)
        self.device = device

    async def report(
        self,
        account: types.Account,
        partner_ids: Sequence[str] = (),
        request_id: str | None = None,
    ) -> pb.ReportAccountUseResponse:
        """Reports the account as used here. Retrying with the same request_id is safe."""
        response: pb.ReportAccountUseResponse = await self._stub.ReportAccountUse(
            pb.ReportAccountUseRequest(
                request_id=request_id or secrets.token_hex(12),
                device=self.device,
                account=account,
                partner_ids=partner_ids,
            )
        )
        return response

    def bindings(self, include_revoked: bool = False) -> AsyncIterator[pb.AccountBinding]:
        """Every binding of this device, newest first, fetched page by page."""
        return every(
            lambda token: self._stub.ListBindings(
                pb.ListBindingsRequest(
                    device=self.device,
                    include_revoked=include_revoked,
                    page_size=500,
                    page_token=token,
                )
            ),
            lambda page: page.bindings,
        )

    async def unbind(self, binding_id: str, request_id: str | None = None) -> pb.AccountBinding:
        response: pb.UnbindResponse = await self._stub.Unbind(
            pb.UnbindRequest(
                request_id=request_id or secrets.token_hex(12),
                binding_id=binding_id,
                device=self.device,
            )
        )
        return response.binding


def _device_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--imei", help="the device's 15-digit IMEI")
    which.add_argument("--meid", help="the device's 14-hex-digit MEID")
    which.add_argument("--serial", help="the device's serial number (no modem)")


def _device(args: argparse.Namespace) -> types.Device:
    if args.imei:
        return accounts.device("imei", args.imei)
    if args.meid:
        return accounts.device("meid", args.meid)
    return accounts.device("serial_number", args.serial)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("report", help="report an account used on a device; binds it")
    _device_arguments(p)
    p.add_argument("account", help="the account, e.g. +4915112345678")
    p.add_argument("--kind", choices=accounts.ACCOUNT_KINDS, default="phone_number")
    p.add_argument("--region", default="", help="region of a national phone number, e.g. DE")
    p.add_argument(
        "--partner", action="append", default=[], help="check only this partner (repeatable)"
    )
    p.add_argument("--request-id", help="reuse to retry a report safely")
    p.set_defaults(handler=report, flags=accounts.ACCOUNT_FLAGS)

    p = sub.add_parser("bindings", help="list the bindings of a device")
    _device_arguments(p)
    p.add_argument("--all", action="store_true", help="include revoked bindings")
    p.set_defaults(handler=list_bindings)

    p = sub.add_parser("unbind", help="revoke a binding of a device")
    _device_arguments(p)
    p.add_argument("binding_id")
    p.add_argument("--request-id", help="reuse to retry safely")
    p.set_defaults(handler=unbind)


async def report(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    client = DeviceBinding(channel, _device(args))
    response = await client.report(
        accounts.account(args.kind, args.account, args.region), args.partner, args.request_id
    )
    print_message(response)


async def list_bindings(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    async for binding in DeviceBinding(channel, _device(args)).bindings(args.all):
        print_message(binding)


async def unbind(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    binding = await DeviceBinding(channel, _device(args)).unbind(args.binding_id, args.request_id)
    print_message(binding)
