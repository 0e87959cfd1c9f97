"""What the counting script is told for one call: which of an identity's
counted accounts belong to the same person as this call, and how many of
them a limit tolerates.

- A **rare** identity (seen in fewer than POPULAR_EPISODES separate
  episodes from new networks) is one person wherever it connects from:
  every account counted for it counts, from any network within
  ROTATION_WINDOW of each other, and from any network ever once it has been
  refused (it is being farmed), unless the call's fingerprint is one that
  SHARED_STRANGERS or more other browsers are expected to show exactly: a
  farm on a common device leaves its mark on every stranger who shares
  that device's defaults, and one coming later from elsewhere is no more
  likely the farm than one of them. In the book's first day (IdentityBook.fresh),
  such a fingerprint counts only this network's accounts: popularity takes
  hours to show, and until it can, a common phone's owners arriving from
  networks of their own look like one browser rotating them.
- A **popular** identity (a phone model with default settings) is many
  people: only the accounts counted on this network count. On a crowded
  network (carrier NAT) only those of the last CROWD_WINDOW, with an
  allowance for the strangers its popularity puts there.
- Either way, registrations in the last 10 minutes, hour, 6 hours and day
  may not exceed what the identity's own rate explains (a Poisson tail of
  VELOCITY_TAIL) or the limit, whichever is larger: a burst through rotating
  networks stands out against how often the fingerprint is normally seen.
  Beyond the hour, a window also allows the hour's threshold plus what the
  rate explains for the rest of it: a burst the hour judged does not keep
  refusing the strangers who share a popular fingerprint for six hours
  after it ended; a burst that goes on is still refused within the hour.
  In the book's first day the rate has no day behind it: its average over
  the hours watched is what a popular set-up's first (often quiet) hours
  showed, far under its afternoon pace. Then the rate is at least the
  identity's own over the last RECENT_WINDOW, leaving out only the last
  VELOCITY_WINDOWS[0], so that a burst never explains itself.
- A **farmed** identity (refused as one browser before) that registers
  again within VELOCITY_WINDOWS[0] of its last registration is the farm
  in its burst: its accounts from every network count, unless its rate
  puts more than FARM_BURST_STRANGERS strangers' registrations in such a
  window. A farm whose identity turned popular, or whose fingerprint
  strangers share, counts per network, and would otherwise get N
  accounts on every network it rotates to. The bound makes at most about
  one such refusal in twenty a stranger's (the bound of a farm's return,
  FARM_RETURN_RARE); a household signing up two accounts at once on a
  farm's fingerprint is refused its second, as the farm would be.

The script applies these; Python only computes the numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from tether.server.guard.identities import (
    FARM_RETURN_RARE,
    SHARED_STRANGERS,
    IdentityBook,
    rate_per_hour,
)
from tether.server.guard.signals import HOUR, poisson_quantile

ROTATION_WINDOW = 6 * HOUR
CROWD_WINDOW = 6 * HOUR
VELOCITY_WINDOWS = (600.0, HOUR, 6 * HOUR, 24 * HOUR)
VELOCITY_TAIL = 1e-4
RECENT_WINDOW = 6 * HOUR
# Registrations come in daily waves: rates are averages, peaks are higher.
PEAK = 1.5
# Strangers' registrations a farmed identity's rate may put within
# VELOCITY_WINDOWS[0] for its burst rule to apply.
FARM_BURST_STRANGERS = FARM_RETURN_RARE


class Inputs(NamedTuple):
    """The counting script's arguments beyond the entry itself."""

    rare: bool
    rotation_ms: int
    crowd: bool
    crowd_window_ms: int
    # The count on this (crowded) network at which to refuse.
    crowd_threshold: int
    # Per VELOCITY_WINDOWS: the count at which to refuse; 0: no check.
    velocity: tuple[int, ...]
    # For the explanation.
    popularity: int
    rate: float
    crowd_browsers: int
    network_share: float
    # IdentityBook.sharers of the call's fingerprint (0 for a popular
    # identity: nothing reads it).
    sharers: float
    # Whole hours since the book's first sighting; whether the fresh book's rule
    # (no rotation window for a shared fingerprint) applied.
    book_age_hours: float = 0.0
    fresh_book: bool = False
    # The registrations within VELOCITY_WINDOWS[0] from which a farmed
    # identity is in its burst (every network counts); 0: never.
    farm_burst: int = 0

    @property
    def shared(self) -> bool:
        """Rare, but its fingerprint one strangers may show exactly: a
        farmed mark does not make every network count."""
        return self.rare and self.sharers >= SHARED_STRANGERS


def inputs(
    book: IdentityBook,
    identity: str,
    network: str,
    t: float,
    limit: int,
    *,
    fingerprint: str,
    velocity: bool,
) -> Inputs:
    """The counting script's inputs for a call whose fingerprint (resolved
    to `identity`) was seen on `network` at t."""
    popularity = book.popularity(identity)
    rare = not book.popular(identity)
    # Only a rare identity's count reads it.
    sharers = book.sharers(fingerprint) if rare else 0.0
    # A fresh book has not had the hours popularity takes to show: the
    # owners of a common phone, arriving from networks of their own, look
    # like one browser rotating them. A fingerprint strangers share then
    # counts only this network's accounts. Strangers are counted among the
    # browsers the whole first day brings (at the rate seen so far), not
    # only those of its first hours: the owners of a set-up too rare to
    # share among a few hundred browsers still come by the day's thousands.
    fresh_book = (
        rare and book.fresh(t) and book.first_day_sharers(fingerprint, t) >= SHARED_STRANGERS
    )
    rate = rate_per_hour(book, identity, t)
    if velocity and book.fresh(t):
        # Registrations only: logins and rooms have no velocity to judge,
        # and a returning browser's call need not pay for a second rate.
        # The pace the day has reached: an average over every hour watched
        # lags a rising day.
        rate = max(
            rate,
            rate_per_hour(book, identity, t, within=RECENT_WINDOW, leave_out=VELOCITY_WINDOWS[0]),
        )
    rate *= PEAK
    crowd_browsers = book.crowds.browsers(network, t)
    crowd = crowd_browsers >= book.crowds.threshold
    share = book.crowds.share(network, t) if crowd else 0.0
    allowance = poisson_quantile(rate * CROWD_WINDOW / HOUR * share, VELOCITY_TAIL)
    thresholds: tuple[int, ...] = (0,) * len(VELOCITY_WINDOWS)
    farm_burst = 0
    if velocity and limit > 0:
        thresholds = velocity_thresholds(rate, limit)
        farm_burst = int(rate * VELOCITY_WINDOWS[0] / HOUR <= FARM_BURST_STRANGERS)
    return Inputs(
        rare=rare,
        rotation_ms=0 if fresh_book else int(ROTATION_WINDOW * 1000),
        crowd=crowd,
        crowd_window_ms=int(CROWD_WINDOW * 1000),
        crowd_threshold=limit + allowance if limit > 0 else 0,
        velocity=thresholds,
        popularity=popularity,
        rate=rate,
        crowd_browsers=crowd_browsers,
        network_share=share,
        sharers=sharers,
        # Whole hours: the inputs key the explanations kept for returning
        # browsers, and a value changing with every call would miss them.
        book_age_hours=_whole_hours(t - book.known_since),
        fresh_book=fresh_book,
        farm_burst=farm_burst,
    )


def _whole_hours(span: float) -> float:
    """A span in whole hours (0 for none or an infinite one)."""
    return float(max(0, math.floor(span / HOUR))) if math.isfinite(span) else 0.0


def velocity_thresholds(rate: float, limit: int) -> tuple[int, ...]:
    """Per VELOCITY_WINDOWS, the count at which to refuse, for an identity
    seen `rate` times an hour (at peak): what the rate explains over the
    window, or the limit; beyond the hour, at least the shorter window's
    threshold plus what the rate explains for the rest of the window."""
    if rate == 0:
        # A browser not seen before this hour (every first visit): no tail.
        return (limit,) * len(VELOCITY_WINDOWS)
    thresholds: list[int] = []
    for i, window in enumerate(VELOCITY_WINDOWS):
        threshold = max(limit, poisson_quantile(rate * window / HOUR, VELOCITY_TAIL) + 1)
        if window > HOUR:
            rest = (window - VELOCITY_WINDOWS[i - 1]) / HOUR
            threshold = max(
                threshold, thresholds[-1] + poisson_quantile(rate * rest, VELOCITY_TAIL)
            )
        thresholds.append(threshold)
    return tuple(thresholds)
