"""The guard's rules, free of gRPC and HTTP: a bounded number of accounts
may register, log in, or join one room from one browser.

Both the gRPC servicer and the web side call Guard; neither knows how the
counting is done. A call's fingerprint resolves to the identity of the
browser behind it (identities.py), the counting rules for that identity
and network are computed (rules.py), and the check and the record are one
Redis script (decide.py, counters.py). SQL keeps what must survive Redis
and restarts, written behind except for registrations (recorder.py).
"""

from __future__ import annotations

import contextlib
import enum
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import NamedTuple

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors, logs
from tether.server.counters.connection import KEY_PREFIX, connect_pipelined
from tether.server.errors import Violations
from tether.server.guard import fingerprint, identity_record, keys, policies
from tether.server.guard.counters import FOREVER_MS, CountersDown, GuardCounters, Scope
from tether.server.guard.decide import Checked, Decider, Decision, Explanation
from tether.server.guard.fingerprint import FingerprintCache
from tether.server.guard.identities import IdentityBook, Resolution
from tether.server.guard.policies import Policy, PolicyCache
from tether.server.guard.recorder import Change, EntryKey, Recorder, renew_rows
from tether.server.guard.signals import HOUR
from tether.server.guard.store import GuardStore
from tether.server.observability import fast, metrics
from tether.server.runtime import Runtime
from tether.server.shared.accounts import normalize_account
from tether.server.shared.digests import Digester
from tether.server.storage.base import utcnow
from tether.server.validation import check_slug

log = logs.get(__name__)

ROOM = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")


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


LIMIT_REASON = {
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
    # None: absent. A callable converts on demand: a browser the fingerprint
    # cache already knows needs no conversion.
    components: fingerprint.Components | Callable[[], fingerprint.Components | None] | None
    client_ip: str
    # A digest of the components as received (e.g. of their serialized
    # message), letting a repeat skip validation and hashing; b"": none.
    components_key: bytes = b""


class Verdict(NamedTuple):
    allowed: bool
    reason: Reason
    identity: str
    # Accounts counted in the deciding scope (NamedTuple keeps `count` for tuple.count).
    counted: int = 0
    limit: int = 0
    would_deny: bool = False
    fail_open: bool = False
    # The counted entry's expiry in Unix ms; 0: none, or forever.
    expire_ms: int = 0
    explanation: Explanation | None = None

    @property
    def expire_time(self) -> datetime | None:
        return ms_to_time(self.expire_ms)


class Account(NamedTuple):
    digest: bytes
    key_id: str

    @property
    def member(self) -> bytes:
        # 8 bytes tell accounts apart within one identity's hash (a
        # collision needs ~2^32 accounts there) at a quarter of the memory.
        return self.digest[:8]


def ms_to_time(ms: int) -> datetime | None:
    if ms <= 0 or ms >= FOREVER_MS:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC)


def unavailable() -> errors.Unavailable:
    """What every guard RPC answers when Redis does not: never INTERNAL."""
    return errors.Unavailable(
        ErrorReason.ERROR_REASON_GUARD_COUNTERS_UNAVAILABLE,
        "the guard's counters did not answer in time; retry",
    )


@contextlib.contextmanager
def counters_answer() -> Iterator[None]:
    """Turns a Redis failure inside a call that cannot fail open (freeing a
    slot, an operator's call) into UNAVAILABLE."""
    try:
        yield
    except CountersDown as exc:
        raise unavailable() from exc


class Validator:
    """Checks a call's input and reduces it to digests; shared by the live
    service and backtests."""

    def __init__(self, digester: Digester) -> None:
        self.digester = digester
        self.fingerprints = FingerprintCache()
        # Digests of recently seen accounts and addresses (keyed digests
        # cost an HMAC each; a returning browser brings the same ones).
        self._accounts: dict[AccountRef, Account] = {}
        self._networks: dict[str, str] = {}
        # Whole calls checked before, by what they are made of: a returning
        # browser repeats its call, which reduces to what it did last time.
        self._calls: dict[tuple[object, ...], tuple[Action, Account, Checked]] = {}

    def account(
        self, account: AccountRef | None, path: str, violations: Violations
    ) -> Account | None:
        if account is None:
            violations.add(path, "required")
            return None
        known = self._accounts.get(account)
        if known is not None:
            return known
        try:
            normalized = normalize_account(account.kind, account.value, account.region_hint)
        except ValueError as exc:
            violations.add(path + ".value", str(exc))
            return None
        digester = self.digester
        digested = Account(digester.digest(account.kind, normalized), digester.current.key_id)
        fingerprint.remember(self._accounts, account, digested)
        return digested

    @staticmethod
    def scope(service_id: str, action: Action | None, room_id: str, violations: Violations) -> None:
        check_slug(service_id, "service_id", violations)
        if action is None:
            violations.add("action", "required: register, login or collaborate")
        elif action is Action.COLLABORATE:
            if not room_id:
                violations.add("room_id", "required: 1-128 characters of A-Z, a-z, 0-9 and . _ : -")
            elif not ROOM.match(room_id):
                violations.add(
                    "room_id",
                    f"{room_id[:140]!r} is not a room id: 1-128 characters of A-Z, a-z, 0-9"
                    " and . _ : -",
                )
        elif room_id:
            violations.add("room_id", "only for the collaborate action")

    def network(self, client_ip: str) -> str:
        """The client's network, as a keyed digest: never the address."""
        known = self._networks.get(client_ip)
        if known is None:
            network = fingerprint.network(client_ip)
            known = self.digester.digest("guard-network", network)[:8].hex()
            fingerprint.remember(self._networks, client_ip, known)
        return known

    def check(self, call: EvaluateCall) -> tuple[Action, Account, Checked]:
        # Only calls with a components key (a digest of their components as
        # received) can be known: components given as values have none.
        key = (
            call.service_id,
            call.action,
            call.account,
            call.room_id,
            call.components_key,
            call.client_ip,
        )
        known = self._calls.get(key) if call.components_key else None
        if known is not None:
            return known
        checked = self._check(call)
        if call.components_key:
            fingerprint.remember(self._calls, key, checked)
        return checked

    def _check(self, call: EvaluateCall) -> tuple[Action, Account, Checked]:
        violations = Violations()
        self.scope(call.service_id, call.action, call.room_id, violations)
        account = self.account(call.account, "account", violations)
        # A known key was validated when first seen (and is never the empty
        # key of absent components), so it skips conversion and validation.
        fp = self.fingerprints.get(call.components_key)
        components: fingerprint.Components | None = None
        if fp is None:
            source = call.components
            components = source() if callable(source) else source
            if components is None:
                violations.add("components", "required: the fingerprint the page collected")
            else:
                fingerprint.check(components, "components", violations)
        fingerprint.check_ip(call.client_ip, "client_ip", violations)
        violations.raise_if_any()
        assert call.action is not None and account is not None
        if fp is None:
            assert components is not None
            fp = fingerprint.fingerprint_of(self.digester, components)
            self.fingerprints.put(call.components_key, fp)
        checked = Checked(
            call.service_id,
            call.action.value,
            call.room_id,
            account.member,
            fp,
            self.network(call.client_ip),
        )
        return call.action, account, checked


class Guard:
    def __init__(self, runtime: Runtime, store: GuardStore) -> None:
        settings = runtime.settings
        self._digester = runtime.digester
        self.db = runtime.db
        self.bucket_bits = settings.guard_bucket_bits
        self.policies = PolicyCache(runtime.db, settings.guard_policy_cache_seconds)
        self.counters = GuardCounters(
            runtime.redis,
            settings.redis_timeout_seconds,
            connect_pipelined(
                settings.redis_url, settings.redis_timeout_seconds, cluster=settings.redis_cluster
            ),
        )
        self.recorder = Recorder(store)
        self.validator = Validator(runtime.digester)
        self.book = IdentityBook(
            settings.guard_forget_after_days * 24 * HOUR,
            strict_profiles=settings.guard_strict_profile_links,
        )
        self.decider = Decider(self.book, self.counters, self.bucket_bits)
        self._sightings = identity_record.Sightings()
        # An account's link to an identity is rewritten at most hourly.
        self._linked = identity_record.OncePerHour()
        # How far the book has read the record (load, then follow).
        self._marks = identity_record.Watermarks()
        # The book's clock; a test may move it.
        self.clock: Callable[[], float] = time.time

    async def load(self) -> None:
        """Rebuilds the identity book from SQL (at start)."""
        now = self.clock()
        count, self._marks = await identity_record.load(self.db, self.book, now)
        await identity_record.forget_old_sightings(self.db, now)
        log.info("guard identity book loaded", fingerprints=count)
        # Backtests' scratch keys, left by servers that stopped mid-run; the
        # runs still going on in other processes (workers, replicas) keep theirs.
        try:
            running = {
                key.rsplit(":", 1)[1]
                for key in await self.counters.matching(
                    f"{KEY_PREFIX}:{keys.backtest_running('*')}"
                )
            }
            prefix = len(f"{KEY_PREFIX}:{keys.backtest_scope('')}")
            await self.counters.delete_matching(
                f"{KEY_PREFIX}:{keys.backtest_scope('*')}:*",
                keep=lambda key: key[prefix:].split(":", 1)[0] in running,
            )
        except CountersDown as exc:
            log.warning("backtest leftovers not checked", error=str(exc))

    async def warm(self) -> None:
        """Opens the hot path's connection to Redis (one per master of a
        cluster, each checked as a new one is) and loads the counting script,
        before the first call: the first calls after a start pay for no
        connection or NOSCRIPT retry within their time bound."""
        try:
            await self.counters.load_scripts()
        except CountersDown as exc:
            # The first call connects instead; the restorer watches Redis.
            log.warning("guard counters not warmed at start: Redis is down", error=str(exc))

    async def follow(self, *, sweep: bool = False) -> int:
        """Reads into the book what other processes recorded since the last
        read (identity_record.follow), looking further back on a sweep;
        returns the records applied."""
        look_back = identity_record.SWEEP_OVERLAP if sweep else identity_record.FOLLOW_OVERLAP
        return await identity_record.follow(
            self.db, self.book, self._marks, self.clock(), look_back=look_back
        )

    # --- evaluate --------------------------------------------------------
    async def evaluate(self, call: EvaluateCall) -> Verdict:
        action, account, checked = self.validator.check(call)
        policy = await self.policies.get(call.service_id)
        t = self.clock()
        resolution = self.decider.resolve(checked, t)
        allowed = policy.allowed_identities
        # An identity an operator allowed is never joined to a farm.
        candidates = (
            self.decider.farm_candidates(checked, resolution, t)
            if action is Action.REGISTER
            and resolution.identity not in allowed
            and checked.fingerprint.identity not in allowed
            else []
        )
        if candidates:
            # Without Redis no farm can be told: the call is decided (or
            # fails) as any other below.
            with contextlib.suppress(CountersDown):
                resolution = await self.decider.farm_return(checked, resolution, candidates, t)
        identity = resolution.identity
        change = self._learned(checked, resolution, t)
        if self._linked.first((call.service_id, identity, account.digest, action), t):
            self._link(change, call.service_id, action, account, identity)
        if identity in allowed or checked.fingerprint.identity in allowed:
            return self._answer(
                action, Verdict(True, Reason.IDENTITY_ALLOW_LISTED, identity), change
            )
        if (
            policy.allowed_account_digests
            and account.digest.hex() in policy.allowed_account_digests
        ):
            return self._answer(
                action, Verdict(True, Reason.ACCOUNT_ALLOW_LISTED, identity), change
            )

        decider = self.decider
        try:
            if resolution.merged:
                # The joined identities' counts now count for this one.
                await decider.move_counts(
                    resolution.merged, identity, call.service_id, call.room_id
                )
            prepared = decider.prepare(checked, resolution, policy, t)
            decision = await decider.run(checked, resolution, prepared, 0)
        except CountersDown as exc:
            return self._answer(action, self._counters_down(policy, identity, exc), change)
        verdict = verdict_of(action, decision)
        count = decision.counted
        if count.over and count.scope == Scope.BROWSER:
            change.farmed.add((call.service_id, action.value, call.room_id, identity))
        if not count.allowed or count.already_counted:
            # Nothing new to count in SQL: a re-login's longer expiry reaches
            # SQL only through RenewLogin, which keeps the hot path free of
            # writes (a rebuild may then free such a session early, never late).
            return self._answer(action, verdict, change)
        entry = EntryKey(
            call.service_id,
            action.value,
            call.room_id,
            checked.fingerprint.identity,
            account.member,
        )
        change.put[entry] = (verdict.expire_time, checked.network)
        if action is Action.REGISTER:
            await self._commit_registration(change, decision.key, decision.field, account.member)
            return self._answer(action, verdict)
        return self._answer(action, verdict, change)

    def _answer(self, action: Action, verdict: Verdict, change: Change | None = None) -> Verdict:
        """An Evaluate's answer: its verdict counted, and what it changed
        queued for SQL. (Every way out of evaluate passes here, rather than
        evaluate wrapping a coroutine of its own: one await less per call.)"""
        if change is not None:
            self.recorder.later(change)
        _count_verdict(action, verdict)
        return verdict

    def _learned(self, checked: Checked, resolution: Resolution, t: float) -> Change:
        change = Change()
        sighting = self._sightings.new(checked.fingerprint.identity, checked.network, t)
        # A returning browser (most calls) taught the book nothing.
        if resolution.new or resolution.merged or sighting is not None:
            merges = [
                link
                for gone in resolution.merged
                if (link := self.book.merge_link(gone)) is not None
            ]
            identity_record.learned(
                change,
                checked.fingerprint,
                links=resolution.links,
                new=resolution.new,
                merges=merges,
                sighting=sighting,
                network=checked.network,
                t=t,
            )
        return change

    @staticmethod
    def _link(
        change: Change, service_id: str, action: Action, account: Account, identity: str
    ) -> None:
        now = utcnow()
        change.links.append(
            {
                "service_id": service_id,
                "identity": identity,
                "account_digest": account.digest,
                "key_id": account.key_id,
                "last_action": action.value,
                "first_seen_time": now,
                "last_seen_time": now,
            }
        )

    async def _commit_registration(
        self, change: Change, key: str, field: bytes, member: bytes
    ) -> None:
        try:
            await self.recorder.commit(change)
        except Exception as exc:
            # Not durable, so not counted: give the slot back.
            await self.counters.remove(key, field, member)
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
            metrics.GUARD_FAIL_OPEN.inc()
            return Verdict(True, Reason.COUNTERS_UNAVAILABLE, identity, fail_open=True)
        metrics.GUARD_FAIL_CLOSED.inc()
        raise unavailable() from exc

    # --- freeing slots ---------------------------------------------------
    async def _target(
        self,
        service_id: str,
        action: Action,
        room_id: str,
        identity: str,
        account: AccountRef | None,
    ) -> tuple[Policy, tuple[str, bytes], bytes, set[EntryKey]]:
        """The policy, the identity's (key, field), the account's member
        and its SQL entries."""
        violations = Violations()
        self.validator.scope(service_id, action, room_id, violations)
        fingerprint.check_identity(identity, "identity", violations)
        acct = self.validator.account(account, "account", violations)
        violations.raise_if_any()
        assert acct is not None
        policy = await self.policies.get(service_id)
        current = self.book.find(identity)
        place = (
            self.decider.key(service_id, action.value, room_id, current),
            keys.field(current, room_id),
        )
        # The account may have been counted through any of the identity's
        # fingerprints.
        entries = {
            EntryKey(service_id, action.value, room_id, member, acct.member)
            for member in {identity, *self.book.members(current)}
        }
        return policy, place, acct.member, entries

    async def _remove(self, place: tuple[str, bytes], member: bytes) -> bool:
        with counters_answer():
            return await self.counters.remove(*place, member)

    async def cancel_registration(
        self, service_id: str, identity: str, account: AccountRef | None
    ) -> bool:
        _, place, member, entries = await self._target(
            service_id, Action.REGISTER, "", identity, account
        )
        removed = await self._remove(place, member)
        await self.recorder.commit(Change(drop=entries))
        return removed

    async def end_login(self, service_id: str, identity: str, account: AccountRef | None) -> bool:
        _, place, member, entries = await self._target(
            service_id, Action.LOGIN, "", identity, account
        )
        removed = await self._remove(place, member)
        self.recorder.later(Change(drop=entries))
        return removed

    async def leave_room(
        self, service_id: str, room_id: str, identity: str, account: AccountRef | None
    ) -> bool:
        _, place, member, entries = await self._target(
            service_id, Action.COLLABORATE, room_id, identity, account
        )
        removed = await self._remove(place, member)
        self.recorder.later(Change(drop=entries))
        return removed

    async def renew_login(
        self, service_id: str, identity: str, account: AccountRef | None
    ) -> datetime:
        policy, place, member, entries = await self._target(
            service_id, Action.LOGIN, "", identity, account
        )
        with counters_answer():
            expire_ms = await self.counters.renew(
                *place, member, policy.login_session_seconds * 1000
            )
        expire_time = ms_to_time(expire_ms)
        if expire_time is None:
            raise errors.NotFound(
                ErrorReason.ERROR_REASON_GUARD_LOGIN_NOT_FOUND,
                "no live login session for this identity and account; evaluate a new login",
            )
        # Which of the identity's fingerprints the session came through is
        # in SQL only: renew the row that exists.
        await renew_rows(self.db, entries, expire_time)
        return expire_time

    # --- policies --------------------------------------------------------
    def account_digest(self, account: AccountRef, path: str, violations: Violations) -> str | None:
        acct = self.validator.account(account, path, violations)
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


# The verdicts series' children by (action, allowed, reason), made on first use.
_VERDICT_COUNTERS: dict[tuple[Action | None, bool, Reason], Callable[[float], None]] = {}


def _count_verdict(action: Action | None, verdict: Verdict) -> None:
    key = (action, verdict.allowed, verdict.reason)
    counter = _VERDICT_COUNTERS.get(key)
    if counter is None:
        counter = fast.increment(
            metrics.GUARD_VERDICTS.labels(
                action.value if action is not None else "",
                "allow" if verdict.allowed else "deny",
                verdict.reason.value,
            )
        )
        _VERDICT_COUNTERS[key] = counter
    counter(1)


def verdict_of(action: Action, decision: Decision) -> Verdict:
    """The verdict a counting decision gives, for the live service and a
    backtest alike."""
    count = decision.counted
    identity = decision.resolution.identity
    limit = decision.limit
    explanation = decision.explanation
    if not count.allowed:
        return Verdict(
            False, LIMIT_REASON[action], identity, count.counted, limit, explanation=explanation
        )
    expire_ms = count.expire_ms if 0 < count.expire_ms < FOREVER_MS else 0
    if count.already_counted:
        return Verdict(
            True,
            Reason.ALREADY_COUNTED,
            identity,
            count.counted,
            limit,
            expire_ms=expire_ms,
            explanation=explanation,
        )
    return Verdict(
        True,
        LIMIT_REASON[action] if count.over else Reason.WITHIN_LIMIT,
        identity,
        count.counted + 1,
        limit,
        would_deny=count.over,
        expire_ms=expire_ms,
        explanation=explanation,
    )
