"""Start-up refuses what it cannot serve, with a message that says what to do."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

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
        with pytest.raises(SystemExit, match="TETHER_HTTP_LISTEN"):
            await serve(settings)
