"""One Tether server per port: a lock named after the gRPC port.

A supervisor's workers share their port with SO_REUSEPORT, and so could any
other process of the same user that asks for it, silently taking a share of
the calls. So every `tether-server serve` first claims the port's lock and
probes the port under it: a second server fails at start, however it runs.

The lock is a Linux abstract Unix socket (`@tether-server:port:<port>`),
elsewhere an flock on a file in the temporary directory. The kernel drops
either when the last process holding it exits, crashed or not, so a lock is
never stale. Workers inherit the lock's descriptor: while any of them still
runs (an orphan draining after its supervisor died), the port stays claimed.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import struct
import sys
import tempfile
from pathlib import Path

if sys.platform != "win32":
    import fcntl


def _name(port: int) -> str:
    return f"tether-server:port:{port}"


class PortLock:
    """A claimed port. Closing it (or exiting) releases it."""

    def __init__(self, port: int, handle: socket.socket | int) -> None:
        self.port = port
        self._handle = handle

    def fileno(self) -> int:
        """The descriptor to pass to a child (pass_fds) to keep the port claimed."""
        return self._handle if isinstance(self._handle, int) else self._handle.fileno()

    def close(self) -> None:
        if isinstance(self._handle, int):
            os.close(self._handle)
        else:
            self._handle.close()


class PortTaken(Exception):
    """Another Tether server holds the port; the message says which process."""


def claim(port: int) -> PortLock:
    """The port's lock, or PortTaken."""
    # Abstract socket names are Linux's own.
    if platform.system() == "Linux":
        return _claim_abstract(port)
    return _claim_file(port)


def _claim_abstract(port: int) -> PortLock:
    address = "\0" + _name(port)
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(address)
    except OSError as exc:
        lock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortTaken(f"another tether-server{_holder(address)} serves port {port}") from None
    # Listening lets a refused server name the holder (SO_PEERCRED).
    lock.listen(socket.SOMAXCONN)
    return PortLock(port, lock)


def _holder(address: str) -> str:
    """ " (pid N)" of the process that made the lock, when it can be told."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            probe.connect(address)
            credentials = probe.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
    except OSError:
        return ""
    pid, _uid, _gid = struct.unpack("3i", credentials)
    return f" (pid {pid})"


def _claim_file(port: int) -> PortLock:
    path = Path(tempfile.gettempdir()) / f"{_name(port).replace(':', '-')}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise PortTaken(f"another tether-server serves port {port}") from None
    return PortLock(port, fd)
