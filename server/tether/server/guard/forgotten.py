"""The names of fingerprints the identity book forgot without a link.

A forgotten fingerprint that was never linked needs nothing but its name:
if it comes back, it resolves as before (to itself, the identity its
accounts were counted under, or to what that was merged into: merges are
kept apart from it), and it must not be linked anew like a stranger's.
Kept in a dict with its times, such a name cost about 224 bytes, for ever;
here it costs about 5 (bench.guard_memory): a Bloom filter (rbloom) that
grows by adding filters twice the size of the last (a lookup asks each: 8
of them, about 2 us, at 10^6 names).

A name never forgotten is taken for a forgotten one about once in 10^6
(FALSE_POSITIVES, over all the filters): that new browser then starts an
identity of its own instead of being linked, a missed link. Nothing is
wrongly counted by it. What must be exact (an operator's correction naming
a fingerprint) asks SQL.
"""

from __future__ import annotations

from rbloom import Bloom

# The first filter's capacity; each next one holds twice as many.
FIRST_CAPACITY = 1 << 12
# Each filter's false positive rate: the filters are asked together, so the
# i-th gets FALSE_POSITIVES / 2^(i+1) and all of them stay under it.
FALSE_POSITIVES = 1e-6


class ForgottenNames:
    """A set of names that only grows, in a few bytes each, and may answer
    "in" for a name never added (about once in 10^6)."""

    __slots__ = ("_added", "_filters", "_room")

    def __init__(self) -> None:
        self._filters: list[Bloom] = []
        # Names the newest filter still has room for.
        self._room = 0
        self._added = 0

    def add(self, name: str) -> None:
        if name in self:
            return
        if self._room == 0:
            size = FIRST_CAPACITY << len(self._filters)
            rate = FALSE_POSITIVES / (2 << len(self._filters))
            self._filters.append(Bloom(size, rate))
            self._room = size
        self._filters[-1].add(name)
        self._room -= 1
        self._added += 1

    def __contains__(self, name: object) -> bool:
        # Newest first: the largest filter holds most of the names.
        return any(name in part for part in reversed(self._filters))

    def __len__(self) -> int:
        """How many names were added (a name already in counts once)."""
        return self._added

    def size_in_bytes(self) -> int:
        return sum(part.size_in_bits for part in self._filters) // 8
