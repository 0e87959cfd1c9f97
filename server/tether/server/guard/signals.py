"""What the guard learns from the traffic it sees, soft and approximate:
how often something is seen, from how many networks, how common a value
is. These steer linking and the counting rules; the counts themselves stay
exact in Redis.

Every method takes the time explicitly, so a backtest replays history on
its own clock with the same code.
"""

from __future__ import annotations

import functools
import itertools
import math
from array import array
from collections import Counter
from collections.abc import Hashable, Iterable

HOUR = 3600.0

# Occupancy's chunk: a byte of slots (80 minutes of 10-minute slots), and
# the sightings a chunk with k of its slots seen stands for (the Poisson
# rate behind k of CHUNK_SLOTS; a full chunk as if half a slot were empty).
CHUNK_SLOTS = 8
_CHUNK_SIGHTINGS = [
    -CHUNK_SLOTS * math.log(1 - min(seen.bit_count(), CHUNK_SLOTS - 0.5) / CHUNK_SLOTS)
    for seen in range(1 << CHUNK_SLOTS)
]
# A chunk with every slot seen: the most its slots alone can say.
_FULL = (1 << CHUNK_SLOTS) - 1
_FULL_SIGHTINGS = _CHUNK_SIGHTINGS[_FULL]


# Rates repeat (an identity's own, seen again and again): remember the answers.
@functools.lru_cache(maxsize=65536)
def poisson_quantile(mean: float, tail: float) -> int:
    """The smallest q with P(Poisson(mean) > q) <= tail."""
    if mean <= 0:
        return 0
    # From ten standard deviations below the mean (less than 1e-20 of the
    # mass lies below): e^-mean alone underflows to 0 beyond a mean of
    # about 745, and the sum never reached the tail.
    spread = math.sqrt(mean)
    q = max(0, math.floor(mean - 10 * spread))
    term = math.exp(q * math.log(mean) - mean - math.lgamma(q + 1))
    cdf = term
    last = mean + 100 * spread + 100
    while 1 - cdf > tail and q < last:
        q += 1
        term *= mean / q
        cdf += term
    return q


class Occupancy:
    """How often a key is seen, per hour, from which slots it was seen in.

    A burst counts once per slot, so one browser hammering a form looks like
    one visitor, while a fingerprint many people share fills slot after
    slot. Each key keeps a bit per slot over the horizon.

    The rate is the Poisson rate behind the share of slots seen. How often
    a key is seen varies over a day, though, and one estimate over the
    whole horizon takes its busy hours' full slots for as few sightings as
    its quiet hours'. With by_chunk, the rate is estimated chunk by chunk
    (CHUNK_SLOTS slots each) and summed: for a rate that a count is judged
    against (velocity), where a phone model many people use in the evening
    looked rarer than it is and its owners were refused in their busy
    hours. It costs about 3 us a call more, which the linking rates, asked
    for a dozen bands per first visit, do without. And with by_chunk, the
    prior (slots of "not seen" before a key's first sighting) is divided
    among the chunks the key was seen in: one burst keeps all of it, while
    a key seen in one 80-minute period after another is no burst, and its
    young rate needs little of it (a popular phone's new browser version,
    which its owners reach at once, looked a fraction as common as it was).
    The prior never reaches back before the sightings began to be kept
    (rate's watched_since).

    Slots saturate: a key seen in every slot of a chunk could be seen 20
    or 2,000 times in it, and a rate read from slots alone stops at about
    17 an hour. A phone model everyone in a big market owns is seen more
    often, and velocity judged against that ceiling refused its owners by
    the hundred each day. So with by_chunk, a key once seen in a whole
    chunk of slots is counted too, sighting by sighting (`_busy`, a count
    per slot: few keys are that busy), and a full chunk stands for what
    was counted in it when that is more.
    """

    __slots__ = ("_all_slots", "_busy", "_by_chunk", "_keys", "_new", "_prior", "_slot", "_slots")

    def __init__(
        self, slot: float, horizon: float, prior: float, *, by_chunk: bool = False
    ) -> None:
        self._slot = slot
        self._by_chunk = by_chunk
        self._slots = int(horizon // slot)
        # A mask of every slot (a 1,008-bit int for 10-minute slots: made once).
        self._all_slots = (1 << self._slots) - 1
        # Slots of "not seen" assumed before a key's first sighting: a new
        # key is taken as rare until its slots say otherwise.
        self._prior = int(prior // slot)
        # key -> (first slot, last slot, mask); bit k of mask: last slot - k.
        # Tuples, replaced on change: the collector stops tracking a tuple of
        # ints, where a list per key (a book holds ~10 keys per fingerprint)
        # made every full collection walk them all.
        self._keys: dict[Hashable, tuple[int, int, int]] = {}
        # The entry of a key first seen in the latest slot a new key came
        # in, shared by all of them (a new fingerprint brings ten).
        self._new: tuple[int, int, int] | None = None
        # by_chunk: key -> (the first slot counted, sightings per slot in a
        # ring of the horizon's slots, 4 KB for 7 days of 10 minutes); keys
        # once seen in a whole chunk.
        self._busy: dict[Hashable, tuple[int, array[int]]] = {}

    def see(self, key: Hashable, t: float) -> None:
        self._see(key, math.floor(t / self._slot))

    def see_all(self, keys: Iterable[Hashable], t: float) -> None:
        """Several keys seen at once (a fingerprint's bands): the slot once."""
        now = math.floor(t / self._slot)
        see = self._see
        for key in keys:
            see(key, now)

    def _see(self, key: Hashable, now: int) -> None:
        entry = self._keys.get(key)
        if entry is None:
            new = self._new
            if new is None or new[0] != now:
                new = self._new = (now, now, 1)
            self._keys[key] = new
            return
        first, last, mask = entry
        busy = self._busy.get(key) if self._by_chunk else None
        if busy is not None:
            _count(busy, now, last, mask, self._slots)
        if now == last:
            # Seen in this slot already (bit 0 is set since the first
            # sighting): nothing changes.
            return
        if now > last:
            mask = ((mask << (now - last)) | 1) & self._all_slots
            last = now
            if self._by_chunk and busy is None and mask & _FULL == _FULL:
                # Its last chunk's slots all seen: counted from now on.
                counts = array("I", [0]) * self._slots
                counts[now % self._slots] = 1
                self._busy[key] = (now, counts)
        elif last - now < self._slots:
            mask |= 1 << (last - now)
        self._keys[key] = (min(first, now), last, mask)

    def rate(
        self, key: Hashable, t: float, exclude: float, watched_since: float = -math.inf
    ) -> float:
        """Sightings per hour, from the slots before t - exclude (the
        current burst is left out) within the horizon. watched_since: when
        the sightings began to be kept; the prior claims no slot before it
        (a key that came in the first hours was not "not seen" the day
        before: nobody was looking)."""
        entry = self._keys.get(key)
        if entry is None:
            return 0.0
        first, last, mask = entry
        end = math.floor((t - exclude) / self._slot)
        now = math.floor(t / self._slot)
        earliest = now - self._slots
        if watched_since > -math.inf:
            earliest = max(earliest, math.floor(watched_since / self._slot))
        start = max(earliest, first - self._prior)
        slots = end - start
        if slots <= 0:
            return 0.0
        # Slots start .. end-1 are bits last-(end-1) .. last-start of mask.
        low = max(0, last - end + 1)
        high = last - start
        if high < low:
            return 0.0
        seen = (mask >> low) & ((1 << (high - low + 1)) - 1)
        if not seen:
            return 0.0
        if self._by_chunk:
            # A byte of slots is a chunk: the table sums their estimates in C.
            chunks = seen.to_bytes((high - low) // CHUNK_SLOTS + 1, "little")
            sightings = sum(map(_CHUNK_SIGHTINGS.__getitem__, chunks))
            if _FULL in chunks:
                counted = self._busy.get(key)
                if counted is not None:
                    sightings += self._beyond_full(counted, chunks, last - low)
            busy = len(chunks) - chunks.count(0)
            if busy > 1:
                # The prior's slots, shared among the chunks seen (none of
                # its slots is in `seen`: they come before the first).
                slots = end - max(earliest, first - self._prior // busy)
            return sightings / slots * HOUR / self._slot
        # Slots with at least one sighting -> the Poisson rate behind them.
        per_slot = -math.log(1 - min(seen.bit_count(), slots - 0.5) / slots)
        return per_slot * HOUR / self._slot

    def _beyond_full(self, busy: tuple[int, array[int]], chunks: bytes, newest: int) -> float:
        """What the counts of a busy key add to its full chunks' estimate:
        chunk j of `chunks` holds slots newest - 8j down to newest - 8j - 7;
        one begun before the counting did keeps its estimate."""
        counted_from, counts = busy
        ring = self._slots
        more = 0.0
        for j, chunk in enumerate(chunks):
            top = newest - j * CHUNK_SLOTS
            if chunk != _FULL or top - CHUNK_SLOTS + 1 < counted_from:
                continue
            sightings = sum(counts[slot % ring] for slot in range(top - CHUNK_SLOTS + 1, top + 1))
            more += max(0.0, sightings - _FULL_SIGHTINGS)
        return more

    def forget_idle(self, key: Hashable, t: float) -> None:
        """Drops a key not seen within the horizon (its rate is 0 by now)."""
        entry = self._keys.get(key)
        if entry is not None and entry[1] < math.floor(t / self._slot) - self._slots:
            del self._keys[key]
            self._busy.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)


class Spread:
    """In how many separate episodes a key was seen from a network new to
    it: how many people, not how many visits, are behind it.

    A new network within `gap` of the previous new one belongs to the same
    episode, so one browser rotating through proxies for an hour is one
    episode, while a fingerprint that many people share gains an episode
    with every newcomer. On a crowded network (carrier NAT), the same
    address counts again after `crowd_period`: its users change.

    A fingerprint so common that newcomers never leave it `gap` alone
    gains its episodes in the quiet hours (the night). Before the watcher
    has seen any (`fresh`: its first day), such a stream is no evidence of
    one browser, and an episode that has gone on for `fresh_longest` ends
    with the next new network.
    """

    __slots__ = ("_crowd_period", "_fresh_longest", "_gap", "_keys", "_max_networks")

    def __init__(
        self,
        gap: float,
        crowd_period: float,
        fresh_longest: float = math.inf,
        max_networks: int = 64,
    ) -> None:
        self._gap = gap
        self._crowd_period = crowd_period
        self._fresh_longest = fresh_longest
        self._max_networks = max_networks
        # key -> [episodes, last new-network time, networks seen, episode start]
        self._keys: dict[Hashable, list[object]] = {}

    def see(
        self, key: Hashable, network: str, t: float, crowd: bool, *, fresh: bool = False
    ) -> None:
        seen_as: Hashable = (network, math.floor(t / self._crowd_period)) if crowd else network
        entry = self._keys.get(key)
        if entry is None:
            self._keys[key] = [1, t, {seen_as}, t]
            return
        networks = entry[2]
        assert isinstance(networks, set)
        if seen_as in networks:
            return
        if len(networks) < self._max_networks:
            networks.add(seen_as)
        last_new, began = entry[1], entry[3]
        assert isinstance(last_new, float | int) and isinstance(began, float | int)
        if t - last_new >= self._gap or (fresh and t - began >= self._fresh_longest):
            entry[0] = int(entry[0]) + 1  # type: ignore[call-overload]
            entry[3] = t
        entry[1] = t

    def __call__(self, key: Hashable) -> int:
        entry = self._keys.get(key)
        return 0 if entry is None else int(entry[0])  # type: ignore[call-overload]

    def absorb(self, keep: Hashable, gone: Hashable) -> None:
        """A merge: keep's episodes become the larger of the two."""
        other = self._keys.pop(gone, None)
        if other is None:
            return
        mine = self._keys.get(keep)
        if mine is None:
            self._keys[keep] = other
            return
        mine[0] = max(int(mine[0]), int(other[0]))  # type: ignore[call-overload]
        networks = mine[2]
        assert isinstance(networks, set)
        networks |= other[2]  # type: ignore[arg-type]

    def forget(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self._keys.pop(key, None)


class Frequencies:
    """How common each value of each component group is among fingerprints
    seen, for the chance that a stranger matches.

    A value not yet seen often is taken as common (prior `common` weighed
    like `weight` sightings): on a fresh start nothing looks rare, so
    nothing is linked on thin evidence.
    """

    __slots__ = ("_common", "_counts", "_weight", "total")

    def __init__(self, weight: float, common: float) -> None:
        self._weight = weight
        self._common = common
        self._counts: Counter[Hashable] = Counter()
        self.total = 0

    def add(self, values: Iterable[Hashable]) -> None:
        self._counts.update(values)
        self.total += 1

    def remove(self, values: Iterable[Hashable]) -> None:
        """One add of these values undone (a value no longer counted goes)."""
        counts = self._counts
        for value in values:
            left = counts.get(value, 0) - 1
            if left > 0:
                counts[value] = left
            else:
                counts.pop(value, None)
        self.total -= 1

    def count(self, value: Hashable) -> int:
        """How many fingerprints counted showed `value`."""
        return self._counts.get(value, 0)

    def share_of(self, value: Hashable) -> float:
        """The chance a stranger's value is `value`."""
        seen = self._counts.get(value, 0) + self._weight * self._common
        return min(1.0, seen / (self.total + self._weight))

    def share(self, values: Iterable[Hashable]) -> float:
        """The chance a stranger's value is any of `values`."""
        values = list(values)
        # In C (a Counter's missing key goes through Python's __missing__).
        seen = sum(map(self._counts.get, values, itertools.repeat(0)))
        prior = self._weight * self._common * len(values)
        return min(1.0, (seen + prior) / (self.total + self._weight))


class Crowds:
    """How many distinct browsers each network carries: a home has a few;
    carrier NAT, a campus or an office have many, so a match there is
    weaker evidence of one person."""

    __slots__ = ("_horizon", "_networks", "_seen", "threshold")

    def __init__(self, horizon: float, threshold: int) -> None:
        self._horizon = horizon
        self.threshold = threshold
        # network -> browser -> when last; each dict oldest first, so what
        # the horizon left behind is dropped from the front.
        self._networks: dict[str, dict[str, float]] = {}
        # Every browser seen -> when last: the denominator of a share
        # (all seen, until the identity book forgets one).
        self._seen: dict[str, float] = {}

    def see(self, network: str, browser: str, t: float) -> None:
        on = self._networks.get(network)
        if on is None:
            on = self._networks[network] = {}
        renew(on, browser, t)
        renew(self._seen, browser, t)

    def browsers(self, network: str, t: float) -> int:
        """Distinct browsers on the network within the horizon."""
        on = self._networks.get(network)
        if not on:
            return 0
        drop_older(on, t - self._horizon)
        return len(on)

    def crowded(self, network: str, t: float) -> bool:
        return self.browsers(network, t) >= self.threshold

    def share(self, network: str, t: float, population: int = 1) -> float:
        """The fraction of all browsers that use this network, taking the
        population to be at least `population` (a book that has seen a few
        browsers has not seen everyone who could come)."""
        return self.browsers(network, t) / max(population, len(self._seen))

    def forget_idle(self, browser: str, t: float) -> None:
        """Drops a browser not seen within the horizon from the count of all
        (from a network's, its next look drops it)."""
        last = self._seen.get(browser)
        if last is not None and last < t - self._horizon:
            del self._seen[browser]

    def forget_network(self, network: str, t: float) -> None:
        """Drops a network whose browsers were all seen before the horizon."""
        on = self._networks.get(network)
        if on is not None:
            drop_older(on, t - self._horizon)
            if not on:
                del self._networks[network]


def renew(seen: dict[str, float], key: str, t: float) -> None:
    """Marks a key seen at t in a dict kept oldest first (sightings come in
    time order, live and in a replay)."""
    last = seen.get(key)
    if last is not None:
        if last >= t:
            return
        del seen[key]
    seen[key] = t


def drop_older(seen: dict[str, float], oldest: float) -> None:
    """Drops keys last seen before `oldest`, from the front: amortized O(1)."""
    while seen:
        key = next(iter(seen))
        if seen[key] >= oldest:
            return
        del seen[key]


def _count(busy: tuple[int, array[int]], now: int, last: int, mask: int, ring: int) -> None:
    """One sighting in slot `now` of a busy key whose entry was (`last`,
    `mask`) before it: its slot's count, begun again in a slot new to it."""
    counted_from, counts = busy
    # Before the counting, or older than the ring (its place holds a slot
    # of now): nothing to count.
    if now < counted_from or last - now >= ring:
        return
    if now > last or not (mask >> (last - now)) & 1:
        counts[now % ring] = 1
    else:
        counts[now % ring] += 1
