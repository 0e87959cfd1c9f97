"""Who is calling: set by the authenticating handler (transport/interceptor.py)
for the duration of one call."""

from __future__ import annotations

import enum
from contextvars import ContextVar
from dataclasses import dataclass

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server.errors import NotFound, PermissionDenied


class CallerKind(enum.StrEnum):
    DEVICE = "device"
    PARTNER = "partner"
    INTERNAL = "internal"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    credential_id: str
    kind: CallerKind
    # Set for partner credentials only: the one partner they may act for.
    partner_id: str | None = None
    # Set: the credential is valid only over mutual TLS with a client
    # certificate of this subject (transport/tls.py compares them).
    client_subject: str | None = None

    def partner_scope(self, requested: str) -> str:
        """The partner a request acts on, as this caller may see it.

        Partners may omit partner_id (meaning their own). Naming another
        partner gets the same NOT_FOUND as naming one that does not exist, so
        a partner cannot even learn which other partners exist.
        """
        if self.kind is CallerKind.PARTNER:
            assert self.partner_id is not None
            if requested and requested != self.partner_id:
                raise NotFound(
                    ErrorReason.ERROR_REASON_PARTNER_NOT_FOUND,
                    f"partner {requested!r} not found",
                )
            return self.partner_id
        return requested


_current: ContextVar[Principal] = ContextVar("tether_principal")


def set_current(principal: Principal) -> None:
    _current.set(principal)


def require(*kinds: CallerKind) -> Principal:
    """The caller, if its kind may call this RPC; PERMISSION_DENIED otherwise."""
    principal = _current.get()
    if principal.kind not in kinds:
        allowed = ", ".join(k.value for k in kinds)
        raise PermissionDenied(
            ErrorReason.ERROR_REASON_CALLER_NOT_ALLOWED,
            f"a {principal.kind.value} credential may not call this; allowed: {allowed}",
        )
    return principal
