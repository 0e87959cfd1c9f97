"""The identity's and the sketch's exact values: a change of the canonical
form would split every stored browser from its counts and links."""

from __future__ import annotations

import ipaddress

from tether.server.guard import identity as fingerprint
from tether.server.guard.service import _ip_prefix
from tether.server.shared import digests

KEY = digests.Digester([digests.DigestKey("k1", bytes(range(32)))])
BROWSER = fingerprint.Components(
    browser_name=" Chrome ",
    browser_version="131.0",
    os_name="Windows  NT",
    screen_width=1920,
    screen_height=1080,
    pixel_ratio=1.25,
    color_depth=24,
    fonts=["Arial", "arial ", "DejaVu  Sans", "Ⅻ Straße", "Zapfino"],
    plugins=["PDF Viewer: Portable Document Format", "b"],
    languages=["de-DE", " EN "],
    timezone="Europe/Berlin",
    platform="Win32",
    extra={"canvas": " c1 ", "webgl": "W"},
)


def test_identity_and_sketch_keep_their_values() -> None:
    # Computed by the first release's code (identity.py before any speed-up).
    assert fingerprint.identity(KEY, BROWSER) == "e9602cb75178c91a7573051d066a51ca"
    assert fingerprint.sketch(KEY, BROWSER) == {
        "browser": "cae92dbcf9fab195",
        "os": "58881f62b69cf466",
        "screen": "322bb54f0ea01bce",
        "pixel_ratio": "407186e3c8c02cd4",
        "color_depth": "31bd2d3266b5c76b",
        "fonts": "31dbf4d29cffba5f",
        "plugins": "a34b3b6856b8ddba",
        "languages": "16b61017b0a3aa65",
        "timezone": "cb2062df0b79b2e6",
        "platform": "9ed7c4ec8fba6bd2",
        "x.canvas": "148c10621ef9a646",
        "x.webgl": "b8eb9e0d9b72e7ad",
    }
    parts = fingerprint.stable(BROWSER)
    assert fingerprint.identity_of(KEY, parts) == fingerprint.identity(KEY, BROWSER)
    assert fingerprint.sketch_of(KEY, parts) == fingerprint.sketch(KEY, BROWSER)


def test_network_prefix_is_what_ipaddress_says() -> None:
    for address in (
        "198.51.100.23",
        "0.0.0.0",
        "255.255.255.255",
        "10.1.2.3",
        "2001:db8::1",
        "::ffff:192.0.2.1",
        "fe80::1%eth0",
    ):
        bits = 48 if ":" in address else 24
        expected = str(
            ipaddress.ip_network(f"{ipaddress.ip_address(address)}/{bits}", strict=False)
        )
        assert _ip_prefix(address) == expected, address
