"""The vendored FingerprintJS is exactly the pinned npm package's build."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "node_modules" / "@fingerprintjs" / "fingerprintjs"
STATIC = ROOT / "server" / "tether" / "server" / "guard" / "web" / "static"


def test_vendored_fingerprintjs_matches_the_pinned_package() -> None:
    assert PACKAGE.is_dir(), "run `make node_modules/.installed` (pinned in package-lock.json)"
    pinned = json.loads((ROOT / "package.json").read_text())["devDependencies"]
    installed = json.loads((PACKAGE / "package.json").read_text())
    assert installed["version"] == pinned["@fingerprintjs/fingerprintjs"]
    assert installed["license"] == "MIT"
    assert (STATIC / "fp.min.js").read_bytes() == (PACKAGE / "dist" / "fp.min.js").read_bytes(), (
        "run scripts/vendor-fingerprintjs"
    )
    assert (STATIC / "fp.LICENSE").read_bytes() == (PACKAGE / "LICENSE").read_bytes()
