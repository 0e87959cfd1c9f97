"""A fingerprint's digests: normalization, keyed values, and the network a
client address stands for."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from tether.server.errors import Violations
from tether.server.guard import fingerprint
from tether.server.shared import digests

KEY = digests.Digester([digests.DigestKey("k1", bytes(range(32)))])
OTHER_KEY = digests.Digester([digests.DigestKey("k2", bytes(range(1, 33)))])
BROWSER = fingerprint.Components(
    browser_name=" Chrome ",
    browser_version="131.0.6778.85",
    os_name="Windows  NT",
    os_version="10.0",
    screen_width=1920,
    screen_height=1080,
    pixel_ratio=1.25,
    color_depth=24,
    fonts=["Arial", "arial ", "DejaVu  Sans", "Ⅻ Straße", "Zapfino"],
    plugins=["PDF Viewer: Portable Document Format", "b"],
    languages=["de-DE", " EN "],
    timezone="Europe/Berlin",
    platform="Win32",
    extra={"canvas": " c1 ", "webgl": "W", "hardware_concurrency": "8"},
)


def test_the_digests_keep_their_values() -> None:
    # A change of the canonical form would split every stored browser from
    # its counts and links: these are the values of the first release.
    fp = fingerprint.fingerprint_of(KEY, BROWSER)
    assert fp.identity == FIRST_RELEASE["identity"]
    assert [g.hex() for g in fp.groups] == FIRST_RELEASE["groups"]
    assert fp.version == (131, 0, 6778, 85)
    assert fp.os_version == (10, 0)
    assert len(fp.fonts) == 4


def test_a_font_list_checked_before_keeps_its_digests_and_a_bad_one_stays_refused() -> None:
    # A device model's font list recurs: it is checked and normalized once,
    # and later fingerprints with it get the same digests as the first.
    for _ in range(2):
        violations = Violations()
        fingerprint.check(BROWSER, "components", violations)
        assert not violations
        fp = fingerprint.fingerprint_of(KEY, BROWSER)
        assert fp.identity == FIRST_RELEASE["identity"]
        assert [g.hex() for g in fp.groups] == FIRST_RELEASE["groups"]
    bad = replace(BROWSER, fonts=[*BROWSER.fonts, "Ari\x00al"])
    for _ in range(2):
        violations = Violations()
        fingerprint.check(bad, "components", violations)
        assert [v.field for v in violations.items] == ["components.fonts[5]"]


def test_normalization_ignores_case_order_and_spacing() -> None:
    shuffled = replace(
        BROWSER,
        browser_name="chrome",
        fonts=["zapfino", "Dejavu Sans", "ARIAL", "Ⅻ Straße"],
        plugins=["b", "PDF Viewer: Portable Document Format"],
        extra={"hardware_concurrency": "8", "webgl": "W", "canvas": "c1"},
    )
    assert fingerprint.fingerprint_of(KEY, shuffled) == fingerprint.fingerprint_of(KEY, BROWSER)
    # Language order is the user's preference: it counts.
    reordered = replace(BROWSER, languages=[" EN ", "de-DE"])
    assert (
        fingerprint.fingerprint_of(KEY, reordered).identity
        != fingerprint.fingerprint_of(KEY, BROWSER).identity
    )


def test_each_group_moves_alone() -> None:
    base = fingerprint.fingerprint_of(KEY, BROWSER)
    changes = {
        fingerprint.VERSION: replace(BROWSER, browser_version="132.0"),
        fingerprint.SCREEN: replace(BROWSER, screen_width=1600),
        fingerprint.LANGUAGE: replace(BROWSER, timezone="Europe/Paris"),
        fingerprint.SOFTWARE: replace(BROWSER, fonts=[*BROWSER.fonts, "Noto"]),
        fingerprint.DEVICE: replace(BROWSER, extra={**BROWSER.extra, "hardware_concurrency": "4"}),
    }
    for group, changed in changes.items():
        fp = fingerprint.fingerprint_of(KEY, changed)
        differ = [i for i, (a, b) in enumerate(zip(base.groups, fp.groups, strict=True)) if a != b]
        assert differ == [group], fingerprint.GROUP_NAMES[group]


def test_digests_depend_on_the_key_and_hold_no_raw_value() -> None:
    fp = fingerprint.fingerprint_of(KEY, BROWSER)
    other = fingerprint.fingerprint_of(OTHER_KEY, BROWSER)
    assert fp.identity != other.identity
    assert not set(fp.groups) & set(other.groups)
    assert not fp.fonts & other.fonts
    text = repr(fp)
    for raw in ("Chrome", "Arial", "Zapfino", "Europe", "1920", "c1"):
        assert raw.casefold() not in text.casefold()


def test_a_network_is_the_ipv4_address_or_the_ipv6_64() -> None:
    assert fingerprint.network("198.51.100.23") == "198.51.100.23"
    for address in ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::9", "fe80::1%eth0"):
        expected = str(
            ipaddress.ip_network(
                f"{ipaddress.ip_address(address.split('%')[0])!s}/64", strict=False
            )
        )
        assert fingerprint.network(address) == expected


def test_font_sets_are_alike_with_a_few_fonts_apart_or_by_jaccard() -> None:
    alike = fingerprint.fonts_alike
    phone = frozenset(range(9))
    assert alike(frozenset(), frozenset(), 0.8)
    # A few fonts apart, however small the set (Jaccard 6/9 here).
    assert alike(phone, frozenset({*range(1, 9), 100, 101}), 0.8)
    assert not alike(phone, frozenset({*range(2, 9), 100, 101}), 0.8)
    # A large set: more apart, as long as the Jaccard similarity holds.
    desktop = frozenset(range(100))
    assert alike(desktop, frozenset(range(5, 105)), 0.8)  # 95/105
    assert not alike(desktop, frozenset(range(15, 115)), 0.8)  # 85/115


FIRST_RELEASE: dict[str, object] = {
    "identity": "d81f1b7f1af6374a3afe4ae261161f91",
    "groups": [
        "70b65446f67e3904",
        "d963df4ec0a22969",
        "4f98389addd74afd",
        "427cdbb119b93e83",
        "88f58b09a31eacc0",
    ],
}
