"""Bearer tokens: minted once, stored hashed, verified with a short cache.

A token is "<credential_id>.<secret>". The secret has 256 bits of entropy,
so one SHA-256 is enough to store it safely (a slow hash protects guessable
passwords, which these are not), and verification costs microseconds.

Who may call is transport's concern, so the credentials and their table
live here, next to the principal they become; the admin area issues and
revokes them through this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ForeignKey, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from tether.server.shared.partners import Partner
from tether.server.storage.base import Base, UtcDateTime, utcnow
from tether.server.storage.database import Database
from tether.server.transport.principal import CallerKind, Principal

ID_PREFIX = "cred_"


class Credential(Base):
    __tablename__ = "credentials"

    credential_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # device, partner, internal or admin.
    kind: Mapped[str] = mapped_column(String(16))
    partner_id: Mapped[str | None] = mapped_column(
        ForeignKey(Partner.partner_id, ondelete="CASCADE"), index=True
    )
    label: Mapped[str] = mapped_column(String(200), default="")
    # SHA-256 of the token's secret part; the token itself is never stored.
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    # Set: the token is accepted only from a client certificate with this
    # subject (RFC 4514, e.g. "CN=acme-backend,O=ACME"), so a leaked token
    # alone is not enough.
    client_subject: Mapped[str | None] = mapped_column(String(500))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoke_time: Mapped[datetime | None] = mapped_column(UtcDateTime)


@dataclass(frozen=True)
class MintedToken:
    credential: Credential
    token: str


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def mint(
    kind: CallerKind, partner_id: str | None, label: str, client_subject: str | None = None
) -> MintedToken:
    credential_id = ID_PREFIX + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = Credential(
        credential_id=credential_id,
        kind=kind.value,
        partner_id=partner_id,
        label=label,
        secret_hash=_hash(secret),
        client_subject=client_subject,
        create_time=utcnow(),
    )
    return MintedToken(row, f"{credential_id}.{secret}")


class CredentialVerifier:
    """Implements transport.interceptor.Authenticator."""

    def __init__(self, db: Database, cache_seconds: float) -> None:
        self._db = db
        self._ttl = cache_seconds
        self._cache: dict[str, tuple[float, Principal]] = {}
        # One database read per credential at a time: when the cache expires
        # under load, concurrent calls share the read instead of stampeding.
        self._loading: dict[str, asyncio.Task[Credential | None]] = {}

    async def authenticate(self, token: str) -> Principal | None:
        now = time.monotonic()
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now:
            return cached[1]
        credential_id, sep, secret = token.partition(".")
        if not sep or not credential_id.startswith(ID_PREFIX) or len(credential_id) > 40:
            return None
        # Shielded: a call cancelled mid-lookup must not cut the session off
        # half-way (on SQLite that left the write lock held).
        row = await asyncio.shield(self._shared_load(credential_id))
        if row is None or row.revoke_time is not None:
            return None
        if not hmac.compare_digest(row.secret_hash, _hash(secret)):
            return None
        principal = Principal(
            row.credential_id, CallerKind(row.kind), row.partner_id, row.client_subject
        )
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (now + self._ttl, principal)
        return principal

    def _shared_load(self, credential_id: str) -> asyncio.Task[Credential | None]:
        task = self._loading.get(credential_id)
        if task is None:
            task = asyncio.ensure_future(self._load(credential_id))
            self._loading[credential_id] = task
            task.add_done_callback(lambda _t: self._loading.pop(credential_id, None))
        return task

    async def _load(self, credential_id: str) -> Credential | None:
        async with self._db.sessions() as session:
            return await session.get(Credential, credential_id)

    def forget(self, credential_id: str) -> None:
        """Drops a revoked credential from this process's cache at once."""
        for token in [t for t in self._cache if t.startswith(credential_id + ".")]:
            del self._cache[token]


async def create_admin(db: Database, label: str) -> str:
    """Issues an admin credential straight into the database; returns its token.

    How the first admin credential comes to be, before any RPC can be called.
    """
    minted = mint(CallerKind.ADMIN, None, label)
    async with db.transaction() as session:
        session.add(minted.credential)
    return minted.token
