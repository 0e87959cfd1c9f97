"""The guard's rules, free of gRPC and HTTP: a bounded number of accounts
may register, log in, or join one room from one browser.

Both the gRPC servicer and the web side call Guard; neither knows how the
counting is done. One account is counted at most once per (service,
identity, action[, room]); the check and the record are one Redis script.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors, logs
from tether.server.counters.pipelined import PipelinedConnection
from tether.server.errors import Violations
from tether.server.guard import identity as fingerprint
from tether.server.guard import keys, policies
from tether.server.guard.counters import FOREVER_MS, CountersDown, GuardCounters
from tether.server.guard.policies import Policy, PolicyCache
from tether.server.guard.recorder import Change, EntryKey, Recorder
from tether.server.guard.store import GuardStore
from tether.server.runtime import Runtime
from tether.server.shared.accounts import normalize_account
from tether.server.storage.base import utcnow
from tether.server.validation import check_slug

log = logs.get(__name__)

ROOM = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Action(enum.StrEnum):
    REGISTER = "register"
    LOGIN = "login"
    COLLABORATE = "collaborate"


class Reason(enum.StrEnum):
    WITHIN_LIMIT = "within_limit"
    ALREADY_COUNTED = "already_counted"
    REGISTER_LIMIT = "register_limit"
    LOGIN_LIMIT = "login_limit"
    COLLABORATE_LIMIT = "collaborate_limit"
    ACCOUNT_ALLOW_LISTED = "account_allow_listed"
    IDENTITY_ALLOW_LISTED = "identity_allow_listed"
    COUNTERS_UNAVAILABLE = "counters_unavailable"


_LIMIT_REASON = {
    Action.REGISTER: Reason.REGISTER_LIMIT,
    Action.LOGIN: Reason.LOGIN_LIMIT,
    Action.COLLABORATE: Reason.COLLABORATE_LIMIT,
}


# Plain immutable records (NamedTuple): built several times per Evaluate, where
# a frozen dataclass's field-by-field object.__setattr__ showed in profiles.
class AccountRef(NamedTuple):
    kind: str
    value: str
    region_hint: str = ""


class EvaluateCall(NamedTuple):
    """One Evaluate, as the transports hand it over (not yet validated)."""

    service_id: str
    action: Action | None
    account: AccountRef | None
    room_id: str
    # None: absent. A callable converts on demand: a browser the identity
    # cache already knows needs no conversion unless its sketch is recorded.
    components: fingerprint.Components | Callable[[], fingerprint.Components | None] | None
    client_ip: str
    # A digest of the components as received (e.g. of their serialized
    # message), letting a repeat skip validation and hashing; b"": none.
    components_key: bytes = b""


class Verdict(NamedTuple):
    allowed: bool
    reason: Reason
    identity: str
    # Accounts counted for the identity (NamedTuple keeps `count` for tuple.count).
    counted: int = 0
    limit: int = 0
    would_deny: bool = False
    fail_open: bool = False
    # The counted entry's expiry in Unix ms; 0: none, or forever.
    expire_ms: int = 0

    @property
    def expire_time(self) -> datetime | None:
        return _ms_to_time(self.expire_ms)


class _Account(NamedTuple):
    digest: bytes
    key_id: str

    @property
    def member(self) -> bytes:
        # 8 bytes tell accounts apart within one fingerprint's set (a
        # collision needs ~2^32 accounts there) at a quarter of the memory.
        return self.digest[:8]


def counter_key(service_id: str, action: Action, room_id: str, bucket: str) -> str:
    if action is Action.REGISTER:
        return keys.registered(service_id, bucket)
    if action is Action.LOGIN:
        return keys.logged_in(service_id, bucket)
    return keys.room(service_id, room_id, bucket)


def counter_field(identity: str, member: bytes) -> bytes:
    """An entry's field in its bucket: the identity's 16 bytes, then the account's 8."""
    return bytes.fromhex(identity) + member


def _ms_to_time(ms: int) -> datetime | None:
    if ms <= 0 or ms >= FOREVER_MS:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC)


def _unavailable() -> errors.Unavailable:
    return errors.Unavailable(
        ErrorReason.ERROR_REASON_GUARD_COUNTERS_UNAVAILABLE,
        "the guard's counters did not answer in time; retry",
    )


class _LazyComponents:
    """An EvaluateCall's components, converted at most once and only if
    used; their stable form (what the identity and the sketch hash) too."""

    __slots__ = ("_source", "_stable", "_value")

    def __init__(
        self, source: fingerprint.Components | Callable[[], fingerprint.Components | None] | None
    ) -> None:
        self._source = source
        self._value: fingerprint.Components | None = None
        self._stable: dict[str, str] | None = None

    def get(self) -> fingerprint.Components | None:
        if self._value is None and self._source is not None:
            source = self._source
            self._value = source if isinstance(source, fingerprint.Components) else source()
            self._source = None
        return self._value

    def value(self) -> fingerprint.Components:
        value = self.get()
        assert value is not None, "present: the call was validated"
        return value

    def stable(self) -> dict[str, str]:
        if self._stable is None:
            self._stable = fingerprint.stable(self.value())
        return self._stable


def _ip_prefix(client_ip: str) -> str:
    """The client's network (/24, /48): a weak drift-linking hint, never the identity."""
    if ":" not in client_ip:
        # IPv4: what ipaddress spells below, at a fifth of its cost.
        with contextlib.suppress(OSError):
            packed = socket.inet_pton(socket.AF_INET, client_ip)
            return socket.inet_ntop(socket.AF_INET, packed[:3] + b"\0") + "/24"
    ip = ipaddress.ip_address(client_ip)
    bits = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


class Guard:
    def __init__(self, runtime: Runtime, store: GuardStore) -> None:
        self._digester = runtime.digester
        self.db = runtime.db
        self.bucket_bits = runtime.settings.guard_bucket_bits
        self.policies = PolicyCache(runtime.db, runtime.settings.guard_policy_cache_seconds)
        settings = runtime.settings
        self.counters = GuardCounters(
            runtime.redis,
            settings.redis_timeout_seconds,
            PipelinedConnection.from_url(settings.redis_url, settings.redis_timeout_seconds),
        )
        self.recorder = Recorder(store)
        self.identities = fingerprint.IdentityCache()

    # --- validation ------------------------------------------------------
    def _account(
        self, account: AccountRef | None, path: str, violations: Violations
    ) -> _Account | None:
        if account is None:
            violations.add(path, "required")
            return None
        try:
            normalized = normalize_account(account.kind, account.value, account.region_hint)
        except ValueError as exc:
            violations.add(path + ".value", str(exc))
            return None
        digester = self._digester
        return _Account(digester.digest(account.kind, normalized), digester.current.key_id)

    @staticmethod
    def _scope(
        service_id: str, action: Action | None, room_id: str, violations: Violations
    ) -> None:
        check_slug(service_id, "service_id", violations)
        if action is None:
            violations.add("action", "required: register, login or collaborate")
        elif action is Action.COLLABORATE:
            if not ROOM.match(room_id):
                violations.add("room_id", "required: 1-128 characters of A-Z, a-z, 0-9 and . _ : -")
        elif room_id:
            violations.add("room_id", "only for the collaborate action")

    def _key(self, policy: Policy, action: Action, room_id: str, identity: str) -> str:
        bucket = keys.bucket(identity, self.bucket_bits)
        return counter_key(policy.service_id, action, room_id, bucket)

    @staticmethod
    def _rule(policy: Policy, action: Action) -> tuple[int, int]:
        """(limit, lifetime in seconds; 0: forever) of an action."""
        if action is Action.REGISTER:
            return policy.register_limit, policy.register_window_seconds
        if action is Action.LOGIN:
            return policy.login_limit, policy.login_session_seconds
        return policy.collaborate_limit, policy.room_membership_seconds

    # --- evaluate --------------------------------------------------------
    def _check(self, call: EvaluateCall) -> tuple[Action, _Account, _LazyComponents, str]:
        """The valid request's action, account, components and identity."""
        violations = Violations()
        self._scope(call.service_id, call.action, call.room_id, violations)
        acct = self._account(call.account, "account", violations)
        components = _LazyComponents(call.components)
        # A known key was validated when first seen (and is never the empty
        # key of absent components), so it skips conversion and validation.
        identity = self.identities.get(call.components_key)
        if identity is None:
            value = components.get()
            if value is None:
                violations.add("components", "required: the fingerprint the page collected")
            else:
                fingerprint.check(value, "components", violations)
        fingerprint.check_ip(call.client_ip, "client_ip", violations)
        violations.raise_if_any()
        assert call.action is not None and acct is not None
        if identity is None:
            identity = fingerprint.identity_of(self._digester, components.stable())
            self.identities.put(call.components_key, identity)
        return call.action, acct, components, identity

    def _seen(
        self,
        call: EvaluateCall,
        action: Action,
        acct: _Account,
        identity: str,
        components: _LazyComponents,
    ) -> Change:
        """The look-up link and the identity's sketch, for SQL."""
        ip_digest = self._digester.digest(
            "guard-component", "ip_prefix=" + _ip_prefix(call.client_ip)
        )
        now = utcnow()
        link = {
            "service_id": call.service_id,
            "identity": identity,
            "account_digest": acct.digest,
            "key_id": acct.key_id,
            "last_action": action.value,
            "first_seen_time": now,
            "last_seen_time": now,
        }
        ident = {
            "identity": identity,
            "sketch": {
                **fingerprint.sketch_of(self._digester, components.stable()),
                "ip_prefix": ip_digest[:8].hex(),
            },
            "first_seen_time": now,
            "last_seen_time": now,
        }
        return Change(links=[link], identities=[ident])

    async def evaluate(self, call: EvaluateCall) -> Verdict:
        action, acct, components, identity = self._check(call)
        policy = await self.policies.get(call.service_id)
        if identity in policy.allowed_identities:
            self.recorder.later(self._seen(call, action, acct, identity, components))
            return Verdict(True, Reason.IDENTITY_ALLOW_LISTED, identity)
        if policy.allowed_account_digests and acct.digest.hex() in policy.allowed_account_digests:
            self.recorder.later(self._seen(call, action, acct, identity, components))
            return Verdict(True, Reason.ACCOUNT_ALLOW_LISTED, identity)

        limit, life = self._rule(policy, action)
        key = self._key(policy, action, call.room_id, identity)
        field = counter_field(identity, acct.member)
        try:
            count = await self.counters.evaluate(
                key,
                field,
                limit,
                life * 1000,
                record_over=policy.shadow,
                extend=action is not Action.REGISTER,
            )
        except CountersDown as exc:
            return self._counters_down(policy, identity, exc)
        if not count.allowed:
            return Verdict(False, _LIMIT_REASON[action], identity, count.counted, limit)

        expire_ms = count.expire_ms if 0 < count.expire_ms < FOREVER_MS else 0
        if count.already_counted:
            # Nothing new for SQL: a re-login's longer expiry reaches SQL only
            # through RenewLogin, which keeps the hot path free of writes (a
            # rebuild may then free such a session early, never late).
            return Verdict(
                True, Reason.ALREADY_COUNTED, identity, count.counted, limit, expire_ms=expire_ms
            )
        over = limit > 0 and count.counted > limit
        verdict = Verdict(
            True,
            _LIMIT_REASON[action] if over else Reason.WITHIN_LIMIT,
            identity,
            count.counted,
            limit,
            would_deny=over,
            expire_ms=expire_ms,
        )
        entry = EntryKey(call.service_id, action.value, call.room_id, identity, acct.member)
        seen = self._seen(call, action, acct, identity, components)
        seen.put[entry] = verdict.expire_time
        if action is Action.REGISTER:
            await self._commit_registration(seen, key, field)
        else:
            self.recorder.later(seen)
        return verdict

    async def _commit_registration(self, change: Change, key: str, field: bytes) -> None:
        try:
            await self.recorder.commit(change)
        except Exception as exc:
            # Not durable, so not counted: give the slot back.
            await self.counters.remove(key, field)
            raise errors.Unavailable(
                ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                "the registration could not be recorded; retry",
            ) from exc

    def _counters_down(self, policy: Policy, identity: str, exc: CountersDown) -> Verdict:
        log.warning(
            "guard counters unavailable",
            service_id=policy.service_id,
            fail_open=policy.fail_open,
            error=str(exc),
        )
        if policy.fail_open:
            return Verdict(True, Reason.COUNTERS_UNAVAILABLE, identity, fail_open=True)
        raise _unavailable() from exc

    # --- freeing slots ---------------------------------------------------
    async def _target(
        self,
        service_id: str,
        action: Action,
        room_id: str,
        identity: str,
        account: AccountRef | None,
    ) -> tuple[Policy, str, bytes, EntryKey]:
        violations = Violations()
        self._scope(service_id, action, room_id, violations)
        fingerprint.check_identity(identity, "identity", violations)
        acct = self._account(account, "account", violations)
        violations.raise_if_any()
        assert acct is not None
        policy = await self.policies.get(service_id)
        key = self._key(policy, action, room_id, identity)
        entry = EntryKey(service_id, action.value, room_id, identity, acct.member)
        return policy, key, counter_field(identity, acct.member), entry

    async def _remove(self, key: str, field: bytes) -> bool:
        try:
            return await self.counters.remove(key, field)
        except CountersDown as exc:
            raise _unavailable() from exc

    async def cancel_registration(
        self, service_id: str, identity: str, account: AccountRef | None
    ) -> bool:
        _, key, field, entry = await self._target(
            service_id, Action.REGISTER, "", identity, account
        )
        removed = await self._remove(key, field)
        await self.recorder.commit(Change(drop={entry}))
        return removed

    async def end_login(self, service_id: str, identity: str, account: AccountRef | None) -> bool:
        _, key, field, entry = await self._target(service_id, Action.LOGIN, "", identity, account)
        removed = await self._remove(key, field)
        self.recorder.later(Change(drop={entry}))
        return removed

    async def leave_room(
        self, service_id: str, room_id: str, identity: str, account: AccountRef | None
    ) -> bool:
        _, key, field, entry = await self._target(
            service_id, Action.COLLABORATE, room_id, identity, account
        )
        removed = await self._remove(key, field)
        self.recorder.later(Change(drop={entry}))
        return removed

    async def renew_login(
        self, service_id: str, identity: str, account: AccountRef | None
    ) -> datetime:
        policy, key, field, entry = await self._target(
            service_id, Action.LOGIN, "", identity, account
        )
        try:
            expire_ms = await self.counters.renew(key, field, policy.login_session_seconds * 1000)
        except CountersDown as exc:
            raise _unavailable() from exc
        expire_time = _ms_to_time(expire_ms)
        if expire_time is None:
            raise errors.NotFound(
                ErrorReason.ERROR_REASON_GUARD_LOGIN_NOT_FOUND,
                "no live login session for this identity and account; evaluate a new login",
            )
        self.recorder.later(Change(put={entry: expire_time}))
        return expire_time

    # --- policies --------------------------------------------------------
    def account_digest(self, account: AccountRef, path: str, violations: Violations) -> str | None:
        acct = self._account(account, path, violations)
        return None if acct is None else acct.digest.hex()

    def account_candidates(
        self, account: AccountRef | None, path: str, violations: Violations
    ) -> list[bytes]:
        """Every digest the account may be stored under (one per digest key)."""
        if account is None:
            violations.add(path, "required")
            return []
        try:
            normalized = normalize_account(account.kind, account.value, account.region_hint)
        except ValueError as exc:
            violations.add(path + ".value", str(exc))
            return []
        return self._digester.candidates(account.kind, normalized)

    async def set_policy(self, policy: Policy) -> Policy:
        policy = policies.check(policy)
        async with self.db.transaction() as session:
            stored = await policies.save(session, policy)
        self.policies.forget(policy.service_id)
        return stored
