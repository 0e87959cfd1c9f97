"""What the guard's identity book costs in memory, per fingerprint it holds,
against the least any in-memory identity map needs, measured in the same run.

    python -m bench.guard_memory [--seed 1] [--people 20000 60000]

Each target runs in a process of its own over the same simulated population
(bench.guard_population):
- "book": the IdentityBook every Tether process keeps (fingerprints, bands,
  profiles, rates, crowds), fed every event as Evaluate would;
- "exact map": a dict from each fingerprint's identity digest to the
  identity and network it was first seen with (an exact-hash guard's state,
  had it any in memory).
The figure is the growth of the process's resident memory (after a full
collection) divided by the fingerprints held: what an operator sizes a
host by. Two population sizes show whether the cost per fingerprint stays
flat as the book grows. Then the same people over three times as many days
(as many a day as the first size): the book forgets the fingerprints not
seen for FORGET_AFTER, so it holds about a month of them while the map
holds every one ("book, never forgetting": the book without it).
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import os
import secrets
import tracemalloc

from bench.guard_population import Population
from tether.server.guard import fingerprint
from tether.server.guard.forgotten import ForgottenNames
from tether.server.guard.identities import FORGET_AFTER, IdentityBook
from tether.server.shared.digests import Digester, DigestKey

PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def _measure(target: str, seed: int, people: int, days: float = 30.0) -> tuple[int, int]:
    """(bytes grown, fingerprints held) for one target, in this process.
    Both targets digest every event's components in the measured span (as
    Evaluate does, with the same bounded caches); the exact map keeps only
    each new fingerprint's identity and network, the book what it keeps."""
    digester = Digester([DigestKey("k1", secrets.token_bytes(32))])
    events = Population(seed, people=people, days=days).events()
    gc.collect()
    before = _resident()
    networks: dict[str, str] = {}
    book = IdentityBook(math.inf if target == "book, never forgetting" else FORGET_AFTER)
    exact: dict[str, tuple[str, str]] = {}
    for event in events:
        fp = fingerprint.fingerprint_of(digester, fingerprint.Components(**event.components))
        network = networks.get(event.client_ip)
        if network is None:
            digest = digester.digest("guard-network", fingerprint.network(event.client_ip))
            network = networks[event.client_ip] = digest[:8].hex()
        if target.startswith("book"):
            book.resolve(fp, network, event.time)
        elif fp.identity not in exact:
            exact[fp.identity] = (fp.identity, network)
    gc.collect()
    grown = _resident() - before
    return grown, book.size() if target.startswith("book") else len(exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--people", type=int, nargs="+", default=[20_000, 60_000])
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    print("Memory per fingerprint held (resident growth / fingerprints)")
    for people in args.people:
        per: dict[str, float] = {}
        for target in ("exact map", "book"):
            with spawn.Pool(1) as pool:
                grown, held = pool.apply(_measure, (target, args.seed, people))
            per[target] = grown / held
            print(
                f"  {people:>6} people  {target:<10} {held:>7,} fingerprints "
                f"{grown / 1e6:8.1f} MB  {per[target]:7,.0f} bytes each"
            )
        print(f"  {people:>6} people  book / exact map = {per['book'] / per['exact map']:.1f}x")
    people, days = args.people[0] * 3, 90.0
    print(f"Memory after {days:.0f} days ({people:,} people; FORGET_AFTER 30 days)")
    grown_by: dict[str, int] = {}
    for target in ("exact map", "book", "book, never forgetting"):
        with spawn.Pool(1) as pool:
            grown, held = pool.apply(_measure, (target, args.seed, people, days))
        grown_by[target] = grown
        print(f"  {target:<22} {held:>7,} fingerprints held {grown / 1e6:8.1f} MB")
    print(
        f"  book / exact map = {grown_by['book'] / grown_by['exact map']:.1f}x; book / book"
        f" never forgetting = {grown_by['book'] / grown_by['book, never forgetting']:.2f}x"
    )
    forgotten()


def _forgotten_bytes(target: str, names: int) -> int:
    """Bytes the book keeps for `names` fingerprints forgotten without a
    link (traced allocations, names made inside the trace): as a dict of each
    name with its times, as the book kept them before, or as its filter of
    names (guard/forgotten.py)."""
    kept: dict[str, tuple[float, float, None]] = {}
    filtered = ForgottenNames()
    tracemalloc.start()
    for i in range(names):
        name = secrets.token_hex(16)
        if target == "dict":
            kept[name] = (float(i), float(i), None)
        else:
            filtered.add(name)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The filters' bit arrays are rbloom's own allocations (Rust's), which
    # tracemalloc does not see: counted from their size.
    return size + filtered.size_in_bytes()


def forgotten(names: int = 1_000_000) -> None:
    print(f"Fingerprints forgotten without a link ({names:,} names)")
    spawn = multiprocessing.get_context("spawn")
    per: dict[str, float] = {}
    for target in ("dict", "filter"):
        with spawn.Pool(1) as pool:
            per[target] = pool.apply(_forgotten_bytes, (target, names)) / names
    print(f"  name and times in a dict (before)   {per['dict']:7.1f} bytes each")
    print(f"  name in the book's filter (now)     {per['filter']:7.1f} bytes each")
    print(f"  filter / dict = {per['filter'] / per['dict']:.3f}x")


if __name__ == "__main__":
    main()
