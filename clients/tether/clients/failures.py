"""What goes wrong in a command, as one line a person can act on.

Commands raise CommandError where they know the fix; cli.main prints it, or
an RPC error, as one line on stderr and exits with its code, never with a
traceback. Proto field paths in the server's messages are replaced by the
command-line flags that set them, so the line speaks the user's terms.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from tether.clients.errors import HANDSHAKE_FAILED, VERIFY_FAILED, details_of

# Exit codes: 1 the server refused or failed the call; 2 the command line
# or its files are wrong (argparse's own code for usage errors).
EXIT_FAILED = 1
EXIT_USAGE = 2
# The server's message lists this many violations (and counts the rest).
SUMMARIZED = 5


class CommandError(Exception):
    """A failure the user can fix; its message is the whole explanation."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def unreadable(
    flag: str, path: str | Path, error: OSError | UnicodeDecodeError, fix: str
) -> CommandError:
    """A file named on the command line that cannot be read."""
    if isinstance(error, FileNotFoundError):
        why = "no such file"
    elif isinstance(error, IsADirectoryError):
        why = "is a directory, not a file"
    elif isinstance(error, PermissionError):
        why = "permission denied"
    elif isinstance(error, UnicodeDecodeError):
        why = f"not UTF-8 text (byte {error.start})"
    else:
        why = error.strerror or str(error)
    named = f"{flag} {path}" if flag else str(path)
    return CommandError(f"{named}: {why}; {fix}")


def read_text(flag: str, path: str | Path, fix: str) -> str:
    """A file's text, or a CommandError naming the flag, the path and the fix."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise unreadable(flag, path, error, fix) from None


def parse_json(text: str, source: str, fix: str) -> Any:
    """JSON from a file or argument; malformed JSON says where and how to fix it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CommandError(f"{source}: not valid JSON (nested too deeply); {fix}") from None
    except json.JSONDecodeError as error:
        raise CommandError(
            f"{source}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno});"
            f" {fix}"
        ) from None


_Message = TypeVar("_Message", bound=Message)


def parse_message(text: str, source: str, fix: str, message: _Message) -> _Message:
    """A JSON object read into message (proto field names); anything else
    says where and how to fix it."""
    fields = parse_json(text, source, fix)
    if not isinstance(fields, dict):
        raise CommandError(f"{source}: not a JSON object; {fix}")
    try:
        return json_format.ParseDict(fields, message)
    except json_format.ParseError as error:
        raise CommandError(f"{source}: {first_line(error)}; {fix}") from None


def first_line(error: Exception) -> str:
    """An exception's message without the lines some libraries add (protobuf's
    list of every field)."""
    return str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__


def in_user_terms(text: str, flags: Mapping[str, str]) -> str:
    """text with each proto field path replaced by the flag that sets it."""
    for path in sorted(flags, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.]){re.escape(path)}(?![\w])", flags[path], text)
    return text


def rpc_failure(error: grpc.aio.AioRpcError, address: str, flags: Mapping[str, str]) -> str:
    """The line that explains a failed call."""
    detail = details_of(error)
    if detail.code == grpc.StatusCode.UNAVAILABLE and not detail.reason:
        # No Tether error: the channel never reached a server.
        why = "connection refused" if "refused" in detail.message.lower() else "unavailable"
        return (
            f"cannot reach Tether at {address} ({why}); start the server, or point"
            " --address or TETHER_ADDRESS at it"
        )
    message = detail.message
    if len(detail.violations) > SUMMARIZED:
        # The server's message names the first few; a person wants them all.
        message = "invalid request: " + "; ".join(
            f"{path}: {why}" for path, why in detail.violations.items()
        )
    hint = flags.get(detail.reason)
    tags = " ".join(t for t in (detail.code.name, detail.reason) if t)
    return f"{in_user_terms(message, flags)}{f'; check {hint}' if hint else ''} [{tags}]"


# The server's alert when it refuses this client's certificate, or its lack of one.
_CLIENT_CERTIFICATE_ALERT = re.compile(r"ALERT_(?:CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA)")
# The server hanging up at once (under TLS 1.3, how a refused client certificate shows).
_HUNG_UP = re.compile(r"socket closed|connection reset", re.IGNORECASE)
_CLIENT_TLS_FLAGS = (
    "--ca, --cert, --key and --tls (and TETHER_CA_FILE, TETHER_CERT_FILE, TETHER_KEY_FILE)"
)


def tls_failure(error: grpc.aio.AioRpcError, address: str, tls: bool) -> str | None:
    """The line that explains a call that failed in the TLS handshake, or
    None when the failure was something else."""
    detail = details_of(error)
    if detail.code != grpc.StatusCode.UNAVAILABLE or detail.reason:
        return None
    return _handshake_failure(detail.message, address) or _hung_up(detail.message, address, tls)


def _handshake_failure(message: str, address: str) -> str | None:
    """This client refused the handshake, or it was refused in a way gRPC names."""
    verify = VERIFY_FAILED.search(message)
    if verify:
        return (
            f"the certificate of the server at {address} was refused ({verify.group(1).strip()});"
            " pass --ca (or TETHER_CA_FILE) with the CA that signs it, or have the server's"
            " certificate renewed"
        )
    if "WRONG_VERSION_NUMBER" in message:
        return f"the server at {address} does not speak TLS; drop {_CLIENT_TLS_FLAGS}"
    if _CLIENT_CERTIFICATE_ALERT.search(message):
        return _client_certificate_needed(address)
    handshake = HANDSHAKE_FAILED.search(message)
    if handshake:
        return f"the TLS handshake with {address} failed ({handshake.group(1).strip()})"
    return None


def _hung_up(message: str, address: str, tls: bool) -> str | None:
    """The server closed the connection at once: over TLS, it wants a client
    certificate it trusts; in clear, it may want TLS."""
    if not _HUNG_UP.search(message):
        return None
    if tls:
        return _client_certificate_needed(address)
    if speaks_tls(address):
        return (
            f"the server at {address} requires TLS; pass --ca with the CA that signs its"
            " certificate (or TETHER_CA_FILE), or --tls when a public CA signs it"
        )
    return None


def _client_certificate_needed(address: str) -> str:
    return (
        f"the server at {address} closed the connection during the TLS handshake: it"
        " requires a client certificate signed by a CA it trusts; pass --cert and --key"
        " (or TETHER_CERT_FILE and TETHER_KEY_FILE)"
    )


def speaks_tls(address: str, timeout: float = 2.0) -> bool:
    """Whether address answers a TLS handshake (trusting any certificate)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLError as error:
        # An alert is the server speaking TLS (refusing this client, say).
        return "ALERT" in (error.reason or "")
    except (OSError, ValueError):
        return False
