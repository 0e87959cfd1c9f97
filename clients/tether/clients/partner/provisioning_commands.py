"""tether-partner commands of the provisioning area: a demo partner and the
pipeline view."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
from typing import Any

import grpc

from tether.clients import arguments
from tether.clients.cli import print_message
from tether.clients.partner.provisioning import (
    Done,
    Instruction,
    PartnerProvisioning,
    PartnerWorker,
    Result,
    Usage,
    UsageQuery,
)
from tether.provisioning.v1 import messages_pb2 as pb


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run a demo partner: opens every service it is asked to, after a short delay",
    )
    p.add_argument(
        "--delay",
        type=arguments.seconds(zero=True),
        default=0.5,
        help="seconds before each confirmation",
    )
    p.add_argument(
        "--max-in-flight", type=arguments.whole(), default=0, help="0: the server's default"
    )
    p.add_argument("--label", default="demo partner")
    p.set_defaults(handler=serve)

    p = sub.add_parser("pipeline", help="your instructions per state, with the oldest's age")
    p.set_defaults(handler=pipeline)


def _describe(instruction: Instruction) -> str:
    kind = pb.InstructionKind.Name(instruction.kind).removeprefix("INSTRUCTION_KIND_").lower()
    return (
        f"{kind} {instruction.service_id} for {instruction.partner_reference} "
        f"(instruction {instruction.instruction_id}, attempt {instruction.attempt})"
    )


async def serve(args: argparse.Namespace, channel: grpc.aio.Channel) -> int:
    async def on_open(instruction: Instruction) -> Result:
        print(f"received: {_describe(instruction)}", flush=True)
        await asyncio.sleep(args.delay)
        reference = "demo-" + instruction.instruction_id[:8]
        print(f"opened:   {instruction.service_id} as {reference}", flush=True)
        return Done(reference)

    async def on_close(instruction: Instruction) -> Result:
        print(f"received: {_describe(instruction)}", flush=True)
        await asyncio.sleep(args.delay)
        print(f"closed:   {instruction.service_id}", flush=True)
        return Done()

    async def on_usage(query: UsageQuery) -> Usage:
        # Stable made-up figures, so repeated queries look plausible.
        seed = int.from_bytes(hashlib.sha256(query.binding_id.encode()).digest()[:2], "big")
        print(f"usage query for {query.service_id} of {query.partner_reference}", flush=True)
        return Usage({"data_mb": 100 + seed % 900, "sessions": 1 + seed % 20}, period="demo")

    worker = PartnerWorker(
        channel,
        on_open=on_open,
        on_close=on_close,
        on_usage_query=on_usage,
        max_in_flight=args.max_in_flight,
        label=args.label,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(worker.run())
    connected = asyncio.create_task(worker.connected.wait())
    await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        connected.cancel()
        await task  # raises the fatal error
        return 1
    print("demo partner connected; waiting for instructions (Ctrl-C to stop)", flush=True)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    worker.stop()
    await task
    return 0


async def pipeline(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    print_message(await PartnerProvisioning(channel).pipeline())
