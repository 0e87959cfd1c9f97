"""`python -m bench`: runs every area's benchmark in turn."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

AREAS = ("binding", "provisioning", "guard")


def main() -> int:
    failed = 0
    for area in AREAS:
        if importlib.util.find_spec(f"bench.{area}") is None:
            continue
        print(f"\n##### bench.{area}", flush=True)
        # One process per area, so one benchmark's state cannot skew the next.
        failed |= subprocess.call([sys.executable, "-m", f"bench.{area}"])
    return failed


if __name__ == "__main__":
    sys.exit(main())
