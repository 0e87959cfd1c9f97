"""Start-up refuses what it cannot serve, with a message that says what to do."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from tests.support import RunningServer
from tether.server.app import build, serve
from tether.server.settings import Settings
from tether.server.shared import digests


async def test_server_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}",
        redis_url="redis://127.0.0.1:6379/0",
        digest_keys=digests.new_key_spec(),
    )
    with pytest.raises(SystemExit, match="tether-server migrate"):
        await build(settings)


async def test_server_names_the_setting_when_the_web_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        # Embedded defaults, as `make run` starts them, but with 8080 taken.
        settings = Settings(listen="127.0.0.1:0", data_dir=tmp_path, http_listen=f"{host}:{port}")
        before = asyncio.all_tasks()
        with pytest.raises(SystemExit, match="TETHER_HTTP_LISTEN"):
            await serve(settings)
    # What had started (the guard's recorder, book follower and counters
    # watch) stopped with the failed start.
    left = [task.get_name() for task in asyncio.all_tasks() - before if not task.done()]
    assert left == []


async def test_a_second_server_on_a_used_port_refuses_to_start(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    # gRPC's default SO_REUSEPORT would let it bind beside the first and take
    # a share of its calls.
    env = {
        **os.environ,
        "TETHER_LISTEN": pg_server.address,
        "TETHER_DATA_DIR": str(tmp_path),
        "TETHER_HTTP_LISTEN": "127.0.0.1:0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.server",
        "serve",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode != 0
    assert out == b""
    assert err.decode().splitlines() == [
        f"cannot listen on {pg_server.address} for gRPC: Address already in use; set TETHER_LISTEN"
    ]
    # Refused before it made anything.
    assert os.listdir(tmp_path) == []
