"""The quality bench's population generator (bench/guard_population.py):
strategies given by the caller, tricks joined with '+' played together."""

from __future__ import annotations

import pytest

from bench.guard_population import STRATEGIES, Population, check_strategies


def test_joined_tricks_are_played_together() -> None:
    events = Population(
        1, people=400, households=10, farmers=6, strategies=("resize+ip_proxy",)
    ).events()
    farms: dict[str, list[dict[str, object]]] = {}
    for event in events:
        if event.label == "abusive":
            assert event.strategy == "resize+ip_proxy"
            farms.setdefault(event.actor, []).append(
                {
                    "ip": event.client_ip,
                    "screen": (event.components["screen_width"], event.components["screen_height"]),
                }
            )
    assert len(farms) == 6
    for accounts in farms.values():
        # A new proxy exit and a new window size for (nearly) every account.
        assert len({a["ip"] for a in accounts}) > len(accounts) // 2
        assert len({a["screen"] for a in accounts}) > 1


def test_the_default_strategies_are_the_documented_nine() -> None:
    events = Population(2, people=400, households=10, farmers=9).events()
    assert {e.strategy for e in events if e.label == "abusive"} == set(STRATEGIES)


@pytest.mark.parametrize("strategy", ["resize+bogus", "", "combined+resize"])
def test_an_unknown_strategy_is_refused(strategy: str) -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        check_strategies((strategy,))
    with pytest.raises(ValueError, match="unknown strategy"):
        Population(1, people=10, households=1, farmers=1, strategies=(strategy,)).events()
