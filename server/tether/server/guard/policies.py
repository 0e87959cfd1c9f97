"""Per-service guard policies: kept in SQL, cached briefly in each server.

A change through SetPolicy is visible at once on the server that took it
(its cache entry is dropped) and on every other server within the cache's
time to live, so no restart is ever needed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import logs
from tether.server.errors import NotFound, Violations
from tether.server.guard.fingerprint import check_identity
from tether.server.guard.tables import GuardPolicy
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database
from tether.server.validation import check_slug

log = logs.get(__name__)

ENFORCE, SHADOW = "enforce", "shadow"
FAIL_OPEN, FAIL_CLOSED = "fail_open", "fail_closed"
MAX_LIMIT = 10_000
MAX_ALLOWED = 1_000
MAX_WINDOW = 315_360_000
MAX_LIFETIME = 31_536_000
DEFAULT_LIFETIME = 3600


@dataclass(frozen=True)
class Policy:
    service_id: str
    mode: str = ENFORCE
    register_limit: int = 0
    register_window_seconds: int = 0
    login_limit: int = 0
    login_session_seconds: int = DEFAULT_LIFETIME
    collaborate_limit: int = 0
    room_membership_seconds: int = DEFAULT_LIFETIME
    redis_failure: str = FAIL_OPEN
    allowed_account_digests: tuple[str, ...] = ()
    allowed_identities: tuple[str, ...] = ()
    update_time: datetime | None = field(default=None, compare=False)

    @property
    def shadow(self) -> bool:
        return self.mode == SHADOW

    @property
    def fail_open(self) -> bool:
        return self.redis_failure == FAIL_OPEN


FIELD_NAMES = frozenset(f.name for f in fields(Policy)) - {"update_time"}


def check(policy: Policy) -> Policy:
    """Validates every field (reporting all problems) and fills defaults."""
    violations = Violations()
    p = "policy."
    check_slug(policy.service_id, p + "service_id", violations)
    for name in ("register_limit", "login_limit", "collaborate_limit"):
        if not 0 <= getattr(policy, name) <= MAX_LIMIT:
            violations.add(p + name, f"0-{MAX_LIMIT}; 0 turns the rule off")
    if not 0 <= policy.register_window_seconds <= MAX_WINDOW:
        violations.add(p + "register_window_seconds", f"0-{MAX_WINDOW} seconds; 0: forever")
    for name in ("login_session_seconds", "room_membership_seconds"):
        if not 0 <= getattr(policy, name) <= MAX_LIFETIME:
            violations.add(p + name, f"1-{MAX_LIFETIME} seconds; 0: {DEFAULT_LIFETIME}")
    if len(policy.allowed_identities) > MAX_ALLOWED:
        violations.add(p + "allowed_identities", f"at most {MAX_ALLOWED}")
    for i, identity in enumerate(policy.allowed_identities):
        check_identity(identity, f"{p}allowed_identities[{i}]", violations)
    if len(policy.allowed_account_digests) > MAX_ALLOWED:
        violations.add("allowed_accounts", f"at most {MAX_ALLOWED}")
    violations.raise_if_any()
    return replace(
        policy,
        login_session_seconds=policy.login_session_seconds or DEFAULT_LIFETIME,
        room_membership_seconds=policy.room_membership_seconds or DEFAULT_LIFETIME,
        allowed_identities=tuple(dict.fromkeys(policy.allowed_identities)),
        allowed_account_digests=tuple(dict.fromkeys(policy.allowed_account_digests)),
    )


def _from_row(row: GuardPolicy) -> Policy:
    return Policy(
        service_id=row.service_id,
        mode=row.mode,
        register_limit=row.register_limit,
        register_window_seconds=row.register_window_seconds,
        login_limit=row.login_limit,
        login_session_seconds=row.login_session_seconds,
        collaborate_limit=row.collaborate_limit,
        room_membership_seconds=row.room_membership_seconds,
        redis_failure=row.redis_failure,
        allowed_account_digests=tuple(row.allowed_account_digests),
        allowed_identities=tuple(row.allowed_identities),
        update_time=row.update_time,
    )


def not_found(service_id: str) -> NotFound:
    return NotFound(
        ErrorReason.ERROR_REASON_GUARD_SERVICE_NOT_FOUND,
        f"no guard policy for service {service_id!r}; create one with SetPolicy",
        metadata={"service_id": service_id},
    )


async def get(session: AsyncSession, service_id: str) -> Policy:
    row = await session.get(GuardPolicy, service_id)
    if row is None:
        raise not_found(service_id)
    return _from_row(row)


async def find(session: AsyncSession, service_id: str) -> Policy | None:
    row = await session.get(GuardPolicy, service_id)
    return None if row is None else _from_row(row)


async def list_after(session: AsyncSession, after: str, limit: int) -> list[Policy]:
    rows = await session.scalars(
        select(GuardPolicy)
        .where(GuardPolicy.service_id > after)
        .order_by(GuardPolicy.service_id)
        .limit(limit)
    )
    return [_from_row(r) for r in rows]


async def save(session: AsyncSession, policy: Policy) -> Policy:
    """Creates or replaces the policy (already checked)."""
    row = await session.get(GuardPolicy, policy.service_id)
    if row is None:
        row = GuardPolicy(service_id=policy.service_id)
        session.add(row)
    for name in FIELD_NAMES - {"service_id"}:
        value = getattr(policy, name)
        setattr(row, name, list(value) if isinstance(value, tuple) else value)
    row.update_time = utcnow()
    await session.flush()
    return _from_row(row)


class PolicyCache:
    """Policies by service, each trusted for ttl seconds.

    Past its ttl an entry is still served while one background read
    refreshes it, so the many calls arriving at expiry neither wait for SQL
    nor all read it at once; only a service never seen waits (for one
    shared read).
    """

    MAX_ENTRIES = 10_000

    def __init__(self, db: Database, ttl: float) -> None:
        self._db = db
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Policy | None]] = {}
        self._reads: dict[str, asyncio.Task[Policy | None]] = {}
        # Bumped by forget(), so a read that started before a change cannot
        # store what it read after it.
        self._changes = 0

    async def get(self, service_id: str) -> Policy:
        entry = self._entries.get(service_id)
        if entry is None:
            policy = await self._read(service_id)
        else:
            if time.monotonic() - entry[0] > self._ttl:
                self._read(service_id)
            policy = entry[1]
        if policy is None:
            raise not_found(service_id)
        return policy

    def _read(self, service_id: str) -> asyncio.Task[Policy | None]:
        """The one read of this service's policy in flight."""
        task = self._reads.get(service_id)
        if task is None:
            task = asyncio.create_task(self._load(service_id))
            task.add_done_callback(_log_failure)
            self._reads[service_id] = task
        return task

    async def _load(self, service_id: str) -> Policy | None:
        try:
            started, changes = time.monotonic(), self._changes
            async with self._db.sessions() as session:
                policy = await find(session, service_id)
            # Unknown services are cached too, so a flood of bad names costs
            # one read per name and ttl, not one per call.
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            if changes == self._changes:
                self._entries[service_id] = (started, policy)
            return policy
        finally:
            if self._reads.get(service_id) is asyncio.current_task():
                del self._reads[service_id]

    def forget(self, service_id: str) -> None:
        self._changes += 1
        self._entries.pop(service_id, None)
        self._reads.pop(service_id, None)


def _log_failure(task: asyncio.Task[Policy | None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("guard policy not read", error=str(task.exception()))
