"""Keeps gRPC's core logging to errors unless GRPC_VERBOSITY says otherwise.

The core logs every failed TLS handshake on stderr, where a command prints
its own one line instead. gRPC reads the variable once, when it is first
imported, so each command-line tool imports this module before anything
that loads gRPC; client libraries leave the caller's logging alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
