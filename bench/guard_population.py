"""A simulated population registering with a guarded service: who the
FingerprintGuard must let in and whom it must stop.

    python -m bench.guard_population --seed 1 --out events.jsonl

Every seed draws a *world* first (market, device shares, carrier NAT sizes,
IPv6 deployment, how farmers behave) and then its people, so rules tuned on
one seed meet other worlds on the next. Each event is one registration:
time, account, the components a collector would send, the client IP, and a
label (legitimate or abusive) with the strategy behind it.

What the world holds (sources in the comments below; docs/guard-quality.md
shows what the guard makes of it):
- Devices. Phones are drawn from a model list with market shares
  (perturbed per seed); identical models with the same OS and browser
  version give identical fingerprints. Desktops combine OS, browser,
  screen resolution (StatCounter's US shares), pixel ratio and font lists
  (OS defaults plus application packs plus, rarely, personal fonts).
- Versions move: browsers release a minor update weekly and a major one
  every four weeks; each person updates after a personal lag.
- Networks. Mobile data goes through carrier NAT: hundreds of users per
  public IPv4 address, a new address per session; some carriers hand out
  IPv6 (a /64 per connection). Home broadband gives a household an IPv4
  address (sometimes shared, DS-Lite style) and an IPv6 /64 with privacy
  addresses. Some desktops register from a workplace NAT.
- Legitimate people register once; households of 2-3 share one browser.
- Farmers register many accounts in sessions, with one strategy each:
  plain repeats, incognito windows, IP rotation through residential proxies
  or mobile data, browser updates, window resizing, language switching,
  font/plugin (and canvas) noise as anti-detect browsers do, and all
  combined. `--strategies` replaces them, for a world the rules were not
  made on: tricks joined with '+' (resize+ip_proxy) are played together.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

DAY = 86_400.0
START = 1_790_812_800.0  # 2026-10-01T00:00:00Z
STRATEGIES = (
    "plain",
    "incognito",
    "ip_proxy",
    "ip_mobile",
    "browser_update",
    "resize",
    "language",
    "font_noise",
    "combined",
)
# The tricks a strategy may join with "+" (a probe beyond the default
# world: "resize+ip_proxy" resizes and takes a new proxy exit for every
# account; "combined" is the anti-detect set-up described in _farmer).
TRICKS = frozenset(STRATEGIES) - {"combined"}


def check_strategies(strategies: tuple[str, ...]) -> None:
    """Raises ValueError naming a strategy that is neither one of
    STRATEGIES nor tricks joined with '+'."""
    for strategy in strategies:
        if strategy != "combined" and not set(strategy.split("+")) <= TRICKS:
            raise ValueError(
                f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}, "
                "or tricks joined with '+' (resize+ip_proxy)"
            )


# --- markets: languages and time zones -------------------------------------
MARKETS: dict[str, dict[str, Any]] = {
    "US": {
        "languages": [(["en-US", "en"], 0.78), (["en-US"], 0.1), (["es-US", "es", "en"], 0.12)],
        "timezones": [
            ("America/New_York", 0.47),
            ("America/Chicago", 0.29),
            ("America/Denver", 0.07),
            ("America/Los_Angeles", 0.17),
        ],
        "ios_share": 0.55,
    },
    "DE": {
        "languages": [(["de-DE", "de", "en-US", "en"], 0.55), (["de-DE"], 0.25), (["de"], 0.2)],
        "timezones": [("Europe/Berlin", 1.0)],
        "ios_share": 0.33,
    },
    "FR": {
        "languages": [(["fr-FR", "fr", "en-US", "en"], 0.5), (["fr-FR"], 0.35), (["fr"], 0.15)],
        "timezones": [("Europe/Paris", 1.0)],
        "ios_share": 0.3,
    },
    "BR": {
        "languages": [(["pt-BR", "pt", "en-US", "en"], 0.6), (["pt-BR"], 0.4)],
        "timezones": [("America/Sao_Paulo", 0.85), ("America/Manaus", 0.15)],
        "ios_share": 0.15,
    },
    "JP": {
        "languages": [(["ja-JP", "ja"], 0.45), (["ja"], 0.45), (["ja", "en-US", "en"], 0.1)],
        "timezones": [("Asia/Tokyo", 1.0)],
        "ios_share": 0.65,
    },
    "IN": {
        "languages": [(["en-IN", "en"], 0.5), (["en-US", "en"], 0.2), (["hi-IN", "hi", "en"], 0.3)],
        "timezones": [("Asia/Kolkata", 1.0)],
        "ios_share": 0.05,
    },
}
OTHER_LANGUAGES = [
    "es-ES", "it-IT", "nl-NL", "pl-PL", "tr-TR", "ru-RU", "uk-UA", "sv-SE", "da-DK",
    "fi-FI", "nb-NO", "cs-CZ", "hu-HU", "ro-RO", "el-GR", "ko-KR", "zh-CN", "zh-TW",
    "vi-VN", "th-TH", "id-ID", "ar-SA", "he-IL", "pt-PT", "en-GB", "en-CA", "fr-CA",
]  # fmt: skip
OTHER_TIMEZONES = [
    "Europe/London", "Europe/Madrid", "Europe/Rome", "Europe/Warsaw", "Europe/Istanbul",
    "Asia/Seoul", "Asia/Shanghai", "Asia/Singapore", "Australia/Sydney", "America/Toronto",
    "America/Mexico_City", "Africa/Lagos", "Asia/Dubai",
]  # fmt: skip

# --- phones: (name, os, css width, css height, pixel ratio, cores, gpu, share) --
# Shares are of phone page views, a dated snapshot in the spirit of
# StatCounter's and DeviceAtlas's model tables; each seed perturbs them.
PHONES = [
    ("iPhone 15", "iOS", 393, 852, 3.0, 6, "Apple GPU", 6.0),
    ("iPhone 14", "iOS", 390, 844, 3.0, 6, "Apple GPU", 5.5),
    ("iPhone 13", "iOS", 390, 844, 3.0, 6, "Apple GPU", 6.5),
    ("iPhone 15 Pro Max", "iOS", 430, 932, 3.0, 6, "Apple GPU", 4.0),
    ("iPhone 14 Pro Max", "iOS", 430, 932, 3.0, 6, "Apple GPU", 3.0),
    ("iPhone 12", "iOS", 390, 844, 3.0, 6, "Apple GPU", 4.0),
    ("iPhone 11", "iOS", 414, 896, 2.0, 6, "Apple GPU", 4.5),
    ("iPhone SE", "iOS", 375, 667, 2.0, 6, "Apple GPU", 2.0),
    ("iPhone 16", "iOS", 393, 852, 3.0, 6, "Apple GPU", 3.0),
    ("iPhone 16 Pro", "iOS", 402, 874, 3.0, 6, "Apple GPU", 2.5),
    ("iPhone XR", "iOS", 414, 896, 2.0, 6, "Apple GPU", 1.5),
    ("Galaxy S23", "Android", 360, 780, 3.0, 8, "Adreno (TM) 740", 2.5),
    ("Galaxy S24", "Android", 384, 832, 2.8125, 8, "Adreno (TM) 750", 2.0),
    ("Galaxy A54", "Android", 384, 854, 2.8125, 8, "Mali-G68", 3.0),
    ("Galaxy A14", "Android", 412, 915, 1.75, 8, "Mali-G52", 3.5),
    ("Galaxy A34", "Android", 412, 915, 2.625, 8, "Mali-G68", 2.0),
    ("Galaxy A15", "Android", 384, 832, 2.8125, 8, "Mali-G57", 2.5),
    ("Galaxy S22", "Android", 360, 780, 3.0, 8, "Adreno (TM) 730", 1.5),
    ("Galaxy A53", "Android", 412, 915, 2.625, 8, "Mali-G68", 1.5),
    ("Redmi Note 12", "Android", 393, 873, 2.75, 8, "Adreno (TM) 610", 3.0),
    ("Redmi Note 13", "Android", 393, 873, 2.75, 8, "Adreno (TM) 710", 2.5),
    ("Redmi 12", "Android", 393, 873, 2.75, 8, "Mali-G52", 2.0),
    ("Pixel 7", "Android", 412, 915, 2.625, 8, "Mali-G710", 1.2),
    ("Pixel 8", "Android", 412, 915, 2.625, 9, "Mali-G715", 1.2),
    ("Moto G54", "Android", 393, 873, 2.75, 8, "PowerVR BXM-8-256", 1.0),
    ("Oppo A78", "Android", 360, 800, 3.0, 8, "Mali-G57", 1.0),
    ("Vivo Y17s", "Android", 360, 800, 2.0, 8, "PowerVR GE8320", 1.0),
    ("Realme C55", "Android", 393, 873, 2.75, 8, "Mali-G52", 1.0),
    ("OnePlus Nord", "Android", 412, 915, 2.625, 8, "Adreno (TM) 642L", 0.8),
    ("Huawei P30", "Android", 360, 780, 3.0, 8, "Mali-G76", 0.8),
]
# A long tail of rarer phones, generated per seed.
TAIL_PHONES = 120
TAIL_SHARE = 20.0

# --- desktops ----------------------------------------------------------------
# US desktop resolutions, 2018 (StatCounter via the research brief), rest spread.
RESOLUTIONS = [
    ((1920, 1080), 19.45), ((1366, 768), 16.51), ((1440, 900), 8.83), ((1536, 864), 8.0),
    ((1280, 720), 5.0), ((2560, 1440), 5.0), ((1600, 900), 4.0), ((1280, 800), 3.5),
    ((1680, 1050), 3.0), ((1280, 1024), 2.5), ((1920, 1200), 2.5), ((1512, 982), 3.0),
    ((1728, 1117), 2.0), ((3840, 2160), 1.5), ((2560, 1080), 1.0), ((3440, 1440), 1.0),
]  # fmt: skip
DESKTOP_OS = [("Windows", 0.72), ("macOS", 0.2), ("Linux", 0.03), ("ChromeOS", 0.05)]

WINDOWS_FONTS = [
    "Arial", "Arial Black", "Bahnschrift", "Calibri", "Cambria", "Cambria Math", "Candara",
    "Comic Sans MS", "Consolas", "Constantia", "Corbel", "Courier New", "Ebrima",
    "Franklin Gothic", "Gabriola", "Gadugi", "Georgia", "HoloLens MDL2 Assets", "Impact",
    "Ink Free", "Javanese Text", "Leelawadee UI", "Lucida Console", "Lucida Sans Unicode",
    "Malgun Gothic", "Marlett", "Microsoft Himalaya", "Microsoft JhengHei",
    "Microsoft New Tai Lue", "Microsoft PhagsPa", "Microsoft Sans Serif",
    "Microsoft Tai Le", "Microsoft YaHei", "Microsoft Yi Baiti", "MingLiU-ExtB",
    "Mongolian Baiti", "MS Gothic", "MV Boli", "Myanmar Text", "Nirmala UI",
    "Palatino Linotype", "Segoe MDL2 Assets", "Segoe Print", "Segoe Script", "Segoe UI",
    "Segoe UI Emoji", "Segoe UI Historic", "Segoe UI Symbol", "SimSun", "Sitka",
    "Sylfaen", "Symbol", "Tahoma", "Times New Roman", "Trebuchet MS", "Verdana",
    "Webdings", "Wingdings", "Yu Gothic",
]  # fmt: skip
MAC_FONTS = [
    "American Typewriter", "Andale Mono", "Arial", "Arial Black", "Arial Hebrew",
    "Arial Rounded MT Bold", "Avenir", "Avenir Next", "Baskerville", "Big Caslon",
    "Bradley Hand", "Brush Script MT", "Chalkboard", "Chalkduster", "Charter", "Cochin",
    "Comic Sans MS", "Copperplate", "Courier", "Courier New", "Didot", "Futura", "Geneva",
    "Georgia", "Gill Sans", "Helvetica", "Helvetica Neue", "Herculanum", "Hoefler Text",
    "Impact", "Lucida Grande", "Luminari", "Marker Felt", "Menlo", "Monaco", "Noteworthy",
    "Optima", "Palatino", "Papyrus", "Phosphate", "Rockwell", "Savoye LET", "SignPainter",
    "Skia", "Snell Roundhand", "Tahoma", "Times", "Times New Roman", "Trattatello",
    "Trebuchet MS", "Verdana", "Zapfino",
]  # fmt: skip
LINUX_FONTS = [
    "DejaVu Sans", "DejaVu Sans Mono", "DejaVu Serif", "Liberation Mono", "Liberation Sans",
    "Liberation Serif", "Noto Color Emoji", "Noto Sans", "Noto Serif", "Ubuntu",
    "Ubuntu Mono", "Cantarell", "FreeSans", "FreeMono",
]  # fmt: skip
CHROMEOS_FONTS = ["Arimo", "Cousine", "Noto Sans", "Roboto", "Tinos", "Noto Color Emoji"]
IOS_FONTS = [
    "Academy Engraved LET", "American Typewriter", "Arial", "Arial Hebrew", "Avenir",
    "Avenir Next", "Baskerville", "Bodoni 72", "Chalkboard SE", "Chalkduster", "Charter",
    "Cochin", "Copperplate", "Courier New", "Didot", "Futura", "Georgia", "Gill Sans",
    "Helvetica", "Helvetica Neue", "Hoefler Text", "Marker Felt", "Menlo", "Noteworthy",
    "Optima", "Palatino", "Papyrus", "Party LET", "Rockwell", "Savoye LET", "Snell Roundhand",
    "Times New Roman", "Trebuchet MS", "Verdana", "Zapfino",
]  # fmt: skip
ANDROID_FONTS = [
    "Roboto", "Noto Sans", "Noto Serif", "Droid Sans Mono", "Cutive Mono", "Coming Soon",
    "Dancing Script", "Carrois Gothic SC", "Noto Color Emoji",
]  # fmt: skip
SAMSUNG_FONTS = ["SamsungOne", "SECRobotoLight", "Samsung Sans"]
APP_PACKS = {
    "office": (
        0.4,
        ["Aptos", "Bookman Old Style", "Century", "Century Gothic", "Garamond", "Haettenschweiler",
         "Lucida Bright", "Lucida Calligraphy", "Lucida Handwriting", "Monotype Corsiva",
         "MS Outlook", "MS Reference Sans Serif", "Wide Latin", "Bodoni MT", "Book Antiqua",
         "Calisto MT", "Castellar", "Edwardian Script ITC", "Elephant", "Gill Sans MT",
         "Goudy Old Style", "Rockwell Condensed", "Tw Cen MT"],
    ),
    "adobe": (0.08, ["Adobe Caslon Pro", "Adobe Garamond Pro", "Minion Pro", "Myriad Pro",
                     "Source Sans Pro", "Source Code Pro", "Trajan Pro", "Kozuka Gothic Pro"]),
    "libreoffice": (0.08, ["Caladea", "Carlito", "Gentium Basic", "Linux Biolinum G",
                           "Linux Libertine G", "OpenSymbol", "Source Serif Pro"]),
    "developer": (0.06, ["Fira Code", "JetBrains Mono", "Cascadia Code", "Hack",
                         "Inconsolata", "Roboto Mono"]),
    "design": (0.04, ["Montserrat", "Open Sans", "Lato", "Raleway", "Poppins", "Oswald",
                      "Playfair Display", "Merriweather", "Nunito", "Ubuntu"]),
    "games": (0.05, ["Segoe UI Variable", "Bebas Neue", "Orbitron", "Press Start 2P"]),
}  # fmt: skip
# Fonts a few people install by hand, and what anti-detect browsers add.
PERSONAL_FONTS = [f"Font {i:03d}" for i in range(600)]
CHROME_PLUGINS = [
    "PDF Viewer: Portable Document Format",
    "Chrome PDF Viewer: Portable Document Format",
    "Chromium PDF Viewer: Portable Document Format",
    "Microsoft Edge PDF Viewer: Portable Document Format",
    "WebKit built-in PDF: Portable Document Format",
]
EXTRA_PLUGINS = [f"Plugin {i:02d}: Browser extension" for i in range(40)]


def _digest(*parts: object) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def _pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    values, weights = zip(*weighted, strict=True)
    return rng.choices(values, weights)[0]


# --- browser versions over time ---------------------------------------------
@dataclass(frozen=True)
class Release:
    """A browser family's releases: a major every `major_days`, a minor weekly."""

    major0: int
    build: int
    major_days: float
    offset: float

    def version_at(self, t: float) -> str:
        weeks = math.floor((t - self.offset) / (7 * DAY))
        major = self.major0 + math.floor((t - self.offset) / (self.major_days * DAY))
        minor = weeks % 4
        return f"{major}.0.{self.build + 100 * (major - self.major0)}.{40 + 17 * minor}"


RELEASES = {
    "Chrome": Release(130, 6723, 28, -9 * DAY),
    "Edge": Release(130, 2849, 28, -6 * DAY),
    "Samsung Internet": Release(26, 0, 56, -20 * DAY),
    "Firefox": Release(131, 0, 28, -12 * DAY),
}
SAFARI = {"17": "17.6", "18": "18.1"}


def browser_version(browser: str, os_version: str, t: float, lag: float) -> str:
    if browser == "Safari":
        return SAFARI.get(os_version.split(".", maxsplit=1)[0], os_version)
    if browser == "Firefox":
        release = RELEASES["Firefox"]
        major = release.major0 + math.floor((t - lag - release.offset) / (28 * DAY))
        return f"{major}.0"
    return RELEASES[browser].version_at(t - lag)


# --- devices -------------------------------------------------------------------
@dataclass
class Device:
    """One browser on one device: what it would report, before drift."""

    kind: str  # "phone" or "desktop"
    browser: str
    os_name: str
    os_version: str
    screen: tuple[int, int]
    pixel_ratio: float
    color_depth: int
    fonts: list[str]
    plugins: list[str]
    languages: list[str]
    timezone: str
    platform: str
    cores: int
    gpu: str
    touch: bool
    vendor: str
    update_lag: float  # seconds behind the newest release
    canvas_seed: str = ""

    def components(self, t: float, *, extras: bool) -> dict[str, Any]:
        version = browser_version(self.browser, self.os_version, t, self.update_lag)
        out: dict[str, Any] = {
            "browser_name": self.browser,
            "browser_version": version,
            "os_name": self.os_name,
            "os_version": self.os_version,
            "screen_width": self.screen[0],
            "screen_height": self.screen[1],
            "pixel_ratio": self.pixel_ratio,
            "color_depth": self.color_depth,
            "fonts": list(self.fonts),
            "plugins": list(self.plugins),
            "languages": list(self.languages),
            "timezone": self.timezone,
            "platform": self.platform,
        }
        if extras:
            major = version.split(".")[0]
            # Canvas and WebGL renderings depend on GPU, OS and browser
            # engine: identical devices render identically.
            out["extra"] = {
                "canvas": self.canvas_seed
                or _digest("canvas", self.gpu, self.os_name, self.os_version, self.browser, major),
                "webgl": _digest("webgl", self.gpu, self.browser),
                "hardware_concurrency": str(self.cores),
                "touch": _digest("touch", self.touch),
                "vendor": self.vendor,
            }
        return out


@dataclass
class World:
    """What one seed draws before any person: the market and its shares."""

    rng: random.Random
    market: str
    foreign_share: float
    mobile_share: float
    ios_share: float
    phones: list[tuple[Any, ...]]
    phone_weights: list[float]
    ios_versions: list[tuple[str, float]]
    android_versions: list[tuple[str, float]]
    update_lag_days: float
    extras: bool
    # networks
    carriers: list[Carrier]
    isps: list[Isp]
    workplaces: list[str]
    wifi_share: float
    ipv6_share: float
    # farmers
    farmer_mobile_share: float
    farm_gap_minutes: float
    farm_sessions_max: int

    @classmethod
    def draw(cls, seed: int, *, extras: bool | None = None) -> World:
        rng = random.Random(seed)
        market = rng.choice(list(MARKETS))
        info = MARKETS[market]
        ios_share = min(0.9, max(0.03, info["ios_share"] * rng.uniform(0.8, 1.2)))
        phones = list(PHONES)
        for i in range(TAIL_PHONES):
            is_ios = rng.random() < 0.15
            width = rng.choice([360, 375, 384, 390, 393, 400, 412, 414, 428, 430])
            phones.append(
                (
                    f"{'iPhone' if is_ios else 'Phone'} tail {i}",
                    "iOS" if is_ios else "Android",
                    width,
                    rng.choice([740, 760, 780, 800, 844, 851, 873, 880, 915, 932]),
                    rng.choice([2.0, 2.25, 2.5, 2.625, 2.75, 3.0, 3.5]),
                    rng.choice([4, 6, 8]),
                    f"GPU {rng.randrange(30)}",
                    TAIL_SHARE / TAIL_PHONES,
                )
            )
        weights = []
        for phone in phones:
            # Market shares wobble by a factor of ~2 between worlds.
            ios_factor = ios_share / 0.4 if phone[1] == "iOS" else (1 - ios_share) / 0.6
            weights.append(phone[7] * ios_factor * math.exp(rng.gauss(0, 0.5)))
        latest_ios = rng.uniform(0.45, 0.75)
        latest_android = rng.uniform(0.35, 0.6)
        carriers = [Carrier.draw(rng, i, rng.uniform(0.15, 0.5)) for i in range(rng.randint(2, 4))]
        isps = [Isp.draw(rng, i) for i in range(rng.randint(3, 6))]
        return cls(
            rng=rng,
            market=market,
            foreign_share=rng.uniform(0.03, 0.15),
            mobile_share=rng.uniform(0.45, 0.7),
            ios_share=ios_share,
            phones=phones,
            phone_weights=weights,
            ios_versions=[("18.1", latest_ios), ("17.6", (1 - latest_ios) * 0.8),
                          ("16.7", (1 - latest_ios) * 0.2)],
            android_versions=[("14", latest_android), ("13", (1 - latest_android) * 0.6),
                              ("12", (1 - latest_android) * 0.4)],
            update_lag_days=rng.uniform(2, 10),
            extras=rng.random() < 0.5 if extras is None else extras,
            carriers=carriers,
            isps=isps,
            workplaces=[_ipv4(rng, 50 + i % 150) for i in range(rng.randint(10, 40))],
            wifi_share=rng.uniform(0.3, 0.65),
            ipv6_share=rng.uniform(0.0, 0.6),
            farmer_mobile_share=rng.uniform(0.2, 0.6),
            farm_gap_minutes=rng.uniform(0.5, 6.0),
            farm_sessions_max=rng.randint(1, 4),
        )  # fmt: skip

    # --- people's devices ----------------------------------------------------
    def locale(self, rng: random.Random) -> tuple[list[str], str]:
        if rng.random() < self.foreign_share:
            lang = rng.choice(OTHER_LANGUAGES)
            languages = [lang, lang.split("-")[0]] if rng.random() < 0.6 else [lang]
            if rng.random() < 0.4:
                languages.append("en")
            tz = rng.choice(OTHER_TIMEZONES) if rng.random() < 0.3 else self.home_timezone(rng)
            return languages, tz
        info = MARKETS[self.market]
        return list(_pick(rng, info["languages"])), self.home_timezone(rng)

    def home_timezone(self, rng: random.Random) -> str:
        return str(_pick(rng, MARKETS[self.market]["timezones"]))

    def lag(self, rng: random.Random) -> float:
        return rng.expovariate(1 / (self.update_lag_days * DAY))

    def phone(self, rng: random.Random) -> Device:
        name, os_name, w, h, ratio, cores, gpu, _ = rng.choices(self.phones, self.phone_weights)[0]
        languages, tz = self.locale(rng)
        if os_name == "iOS":
            os_version = _pick(rng, self.ios_versions)
            browser = "Safari" if rng.random() < 0.85 else "Chrome"
            fonts = list(IOS_FONTS)
            platform, vendor = "iPhone", "Apple Computer, Inc."
        else:
            os_version = _pick(rng, self.android_versions)
            samsung = name.startswith("Galaxy")
            roll = rng.random()
            browser = (
                "Samsung Internet" if samsung and roll < 0.25 else
                "Firefox" if roll > 0.96 else "Chrome"
            )  # fmt: skip
            fonts = list(ANDROID_FONTS) + (list(SAMSUNG_FONTS) if samsung else [])
            platform = "Linux armv8l" if rng.random() < 0.7 else "Linux aarch64"
            vendor = "Google Inc." if browser != "Firefox" else ""
        return Device(
            kind="phone",
            browser=browser,
            os_name=os_name,
            os_version=os_version,
            screen=(w, h),
            pixel_ratio=ratio,
            color_depth=24 if os_name == "Android" else 32,
            fonts=fonts,
            plugins=[],
            languages=languages,
            timezone=tz,
            platform=platform,
            cores=cores,
            gpu=gpu + " " + name if os_name == "Android" else gpu,
            touch=True,
            vendor=vendor,
            update_lag=self.lag(rng),
        )

    def desktop(self, rng: random.Random) -> Device:
        os_name = _pick(rng, DESKTOP_OS)
        languages, tz = self.locale(rng)
        if os_name == "Windows":
            browser = _pick(rng, [("Chrome", 0.7), ("Edge", 0.2), ("Firefox", 0.1)])
            fonts = list(WINDOWS_FONTS)
            os_version, platform = "10.0", "Win32"
        elif os_name == "macOS":
            browser = _pick(rng, [("Safari", 0.45), ("Chrome", 0.45), ("Firefox", 0.1)])
            fonts = list(MAC_FONTS)
            os_version = _pick(rng, [("10.15.7", 1.0)])
            platform = "MacIntel"
        elif os_name == "Linux":
            browser = _pick(rng, [("Chrome", 0.5), ("Firefox", 0.5)])
            fonts = list(LINUX_FONTS)
            os_version, platform = "", "Linux x86_64"
        else:
            browser, fonts, os_version, platform = (
                "Chrome",
                list(CHROMEOS_FONTS),
                "",
                "Linux x86_64",
            )
        if os_name in ("Windows", "macOS"):
            for probability, pack in APP_PACKS.values():
                if rng.random() < probability:
                    fonts += pack
        if rng.random() < 0.1:
            fonts += rng.sample(PERSONAL_FONTS, rng.randint(1, 6))
        screen = _pick(rng, RESOLUTIONS)
        if os_name == "macOS":
            ratio = 2.0 if rng.random() < 0.7 else 1.0
        else:
            ratio = _pick(rng, [(1.0, 0.6), (1.25, 0.2), (1.5, 0.15), (2.0, 0.05)])
        plugins = [] if browser == "Safari" else list(CHROME_PLUGINS)
        if browser == "Safari" and os_version == "10.15.7":
            os_version = "10.15.7"
        gpu = rng.choice(
            ["Intel UHD 620", "Intel Iris Xe", "NVIDIA GTX 1650", "NVIDIA RTX 3060",
             "AMD Radeon RX 580", "Apple M1", "Apple M2", "Intel HD 520", "NVIDIA RTX 4070"]
        )  # fmt: skip
        return Device(
            kind="desktop",
            browser=browser,
            os_name=os_name,
            os_version=os_version,
            screen=screen,
            pixel_ratio=ratio,
            color_depth=24 if os_name != "macOS" else 30,
            fonts=fonts,
            plugins=plugins,
            languages=languages,
            timezone=tz,
            platform=platform,
            cores=rng.choice([4, 8, 8, 12, 16]),
            gpu=gpu,
            touch=False,
            vendor="Apple Computer, Inc." if browser == "Safari" else "Google Inc.",
            update_lag=self.lag(rng),
        )

    def device(self, rng: random.Random, mobile_share: float | None = None) -> Device:
        share = self.mobile_share if mobile_share is None else mobile_share
        return self.phone(rng) if rng.random() < share else self.desktop(rng)


# --- networks ----------------------------------------------------------------
def _ipv4(rng: random.Random, first: int) -> str:
    return f"{first}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _ipv6_64(rng: random.Random, prefix: str) -> str:
    return f"{prefix}:{rng.randrange(65536):x}:{rng.randrange(65536):x}"


def _ipv6_host(rng: random.Random, net64: str) -> str:
    # A privacy address: a new random interface identifier.
    groups = ":".join(f"{rng.randrange(65536):x}" for _ in range(4))
    return str(ipaddress.IPv6Address(f"{net64}:{groups}"))


@dataclass
class Carrier:
    """A mobile carrier: NAT with hundreds of users per public IPv4 address."""

    name: str
    share: float
    users_per_ip: int
    blocks: list[str]
    ipv6_prefix: str
    ipv6: bool
    pool: list[str] = field(default_factory=list)

    @classmethod
    def draw(cls, rng: random.Random, i: int, share: float) -> Carrier:
        blocks = [
            f"{rng.randrange(80, 220)}.{rng.randrange(256)}.{rng.randrange(256)}"
            for _ in range(rng.randint(1, 4))
        ]
        return cls(
            name=f"carrier-{i}",
            share=share,
            users_per_ip=rng.randint(100, 600),
            blocks=blocks,
            ipv6_prefix=f"2a0{rng.randrange(10)}:{rng.randrange(65536):x}",
            ipv6=rng.random() < 0.5,
        )

    def size_pool(self, rng: random.Random, users: int) -> None:
        size = max(2, round(users / self.users_per_ip))
        self.pool = [f"{rng.choice(self.blocks)}.{rng.randrange(1, 255)}" for _ in range(size)]

    def address(self, rng: random.Random, ipv6_share: float) -> str:
        """A session's address: a new NAT address or a new /64 per connection."""
        if self.ipv6 and rng.random() < ipv6_share:
            return _ipv6_host(rng, _ipv6_64(rng, self.ipv6_prefix))
        return rng.choice(self.pool)


@dataclass
class Isp:
    """Home broadband: an address per household, some behind shared NAT."""

    name: str
    first: int
    shared_nat: float
    ipv6: bool
    ipv6_prefix: str

    @classmethod
    def draw(cls, rng: random.Random, i: int) -> Isp:
        return cls(
            name=f"isp-{i}",
            first=rng.randrange(2, 223),
            shared_nat=rng.choice([0.0, 0.0, 0.1, 0.3]),
            ipv6=rng.random() < 0.6,
            ipv6_prefix=f"2a1{rng.randrange(10)}:{rng.randrange(65536):x}",
        )


@dataclass
class Home:
    """A household's connection."""

    ipv4: str
    ipv6_64: str | None
    # Dynamic addresses: a new IPv4 every few days.
    renew_days: float

    def address(self, rng: random.Random, t: float, ipv6_share: float) -> str:
        if self.ipv6_64 and rng.random() < ipv6_share:
            return _ipv6_host(rng, self.ipv6_64)
        epoch = math.floor(t / (self.renew_days * DAY))
        if epoch == 0:
            return self.ipv4
        # The same household gets another address from its ISP's range.
        prefix = self.ipv4.split(".")[0]
        h = int(_digest(self.ipv4, epoch), 16)
        return f"{prefix}.{h % 256}.{(h >> 8) % 256}.{1 + (h >> 16) % 254}"


class Networks:
    """Hands out homes, carriers and workplaces for a world's people."""

    def __init__(self, world: World, rng: random.Random, mobile_users: int) -> None:
        self.world = world
        total = sum(c.share for c in world.carriers)
        for carrier in world.carriers:
            carrier.size_pool(
                rng, round(mobile_users * (1 - world.wifi_share) * carrier.share / total)
            )
        self._shared: dict[str, list[str]] = {}

    def home(self, rng: random.Random) -> Home:
        isp = rng.choice(self.world.isps)
        if rng.random() < isp.shared_nat:
            pool = self._shared.setdefault(isp.name, [_ipv4(rng, isp.first) for _ in range(40)])
            ipv4 = rng.choice(pool)
            renew = 10_000.0
        else:
            ipv4 = _ipv4(rng, isp.first)
            renew = rng.choice([10_000.0, 10_000.0, rng.uniform(1, 14)])
        v6 = _ipv6_64(rng, isp.ipv6_prefix) if isp.ipv6 else None
        return Home(ipv4, v6, renew)

    def carrier(self, rng: random.Random) -> Carrier:
        return rng.choices(self.world.carriers, [c.share for c in self.world.carriers])[0]

    def proxy(self, rng: random.Random) -> str:
        """A residential proxy exit: anyone's home address, anywhere."""
        if rng.random() < 0.15:
            return _ipv6_host(
                rng, _ipv6_64(rng, f"2a2{rng.randrange(10)}:{rng.randrange(65536):x}")
            )
        return _ipv4(rng, rng.randrange(2, 223))


# --- people --------------------------------------------------------------------
@dataclass
class Event:
    time: float
    account: str
    components: dict[str, Any]
    client_ip: str
    label: str
    strategy: str
    actor: str

    def as_json(self, service_id: str = "quality") -> dict[str, Any]:
        return {
            "service_id": service_id,
            "action": "register",
            "account": {"kind": "login_id", "value": self.account},
            "components": self.components,
            "client_ip": self.client_ip,
            "event_time": self.time,
            "label": self.label,
            "strategy": self.strategy,
            "actor": self.actor,
        }


def _diurnal_time(rng: random.Random, days: float) -> float:
    """A moment in the period, more often in the day and evening than at night."""
    while True:
        t = rng.uniform(0, days * DAY)
        hour = (t % DAY) / 3600
        weight = 0.35 + 0.65 * math.sin(math.pi * max(0.0, min(1.0, (hour - 6) / 18))) ** 2
        if rng.random() < weight:
            return t


@dataclass
class Population:
    seed: int
    people: int = 20_000
    households: int = 600
    farmers: int = 300
    days: float = 30.0
    extras: bool | None = None
    # The farmers' strategies, taken in turn.
    strategies: tuple[str, ...] = STRATEGIES

    def events(self) -> list[Event]:
        check_strategies(self.strategies)
        world = World.draw(self.seed, extras=self.extras)
        rng = random.Random(self.seed * 7919 + 1)
        networks = Networks(world, rng, round(self.people * world.mobile_share))
        events: list[Event] = []
        household_accounts = 0
        for h in range(self.households):
            size = 2 if rng.random() < 0.7 else 3
            household_accounts += size
            events += self._household(world, networks, rng, f"household-{h}", size)
        for p in range(self.people - household_accounts):
            events += self._person(world, networks, rng, f"person-{p}")
        for f in range(self.farmers):
            strategy = self.strategies[f % len(self.strategies)]
            events += self._farmer(world, networks, rng, f"farm-{f}", strategy)
        events.sort(key=lambda e: e.time)
        for event in events:
            event.time += START
        return events

    def _person(
        self, world: World, networks: Networks, rng: random.Random, actor: str
    ) -> list[Event]:
        device = world.device(rng)
        t = _diurnal_time(rng, self.days)
        ip = _where(world, networks, rng, device, t, networks.home(rng))
        return [Event(t, f"{actor}", device.components(t, extras=world.extras), ip,
                      "legitimate", "person", actor)]  # fmt: skip

    def _household(
        self, world: World, networks: Networks, rng: random.Random, actor: str, size: int
    ) -> list[Event]:
        # A shared family computer or tablet, at home.
        device = world.desktop(rng) if rng.random() < 0.7 else world.phone(rng)
        home = networks.home(rng)
        t = _diurnal_time(rng, self.days)
        out = []
        for i in range(size):
            if i:
                t += rng.choice([rng.uniform(60, 3600), rng.uniform(3600, DAY),
                                 rng.uniform(DAY, 10 * DAY)])  # fmt: skip
            out.append(Event(t, f"{actor}-{i}", device.components(t, extras=world.extras),
                             home.address(rng, t, world.ipv6_share), "legitimate",
                             "household", actor))  # fmt: skip
        return out

    def _farmer(
        self, world: World, networks: Networks, rng: random.Random, actor: str, strategy: str
    ) -> list[Event]:
        device = world.device(rng, world.farmer_mobile_share)
        home = networks.home(rng)
        carrier = networks.carrier(rng)
        accounts = max(5, min(60, round(math.exp(rng.gauss(math.log(12), 0.6)))))
        sessions = rng.randint(1, world.farm_sessions_max)
        starts = sorted(_diurnal_time(rng, self.days - 1) for _ in range(sessions))
        gap = world.farm_gap_minutes * 60 * math.exp(rng.gauss(0, 0.5))
        out: list[Event] = []
        session_ip = ""
        # What a farmer cycles through when combining tricks.
        sizes = [device.screen] + [_resized(rng, device.screen) for _ in range(rng.randint(1, 3))]
        languages = [device.languages] + [
            [rng.choice(OTHER_LANGUAGES)] for _ in range(rng.randint(1, 3))
        ]
        for i in range(accounts):
            session = min(sessions - 1, i * sessions // accounts)
            if i == 0 or session != min(sessions - 1, (i - 1) * sessions // accounts):
                t = starts[session]
                on_mobile_data = device.kind == "phone" and rng.random() > world.wifi_share
                session_ip = (
                    carrier.address(rng, world.ipv6_share)
                    if on_mobile_data
                    else home.address(rng, t, world.ipv6_share)
                )
            else:
                t += rng.expovariate(1 / gap)
            components = device.components(t, extras=world.extras)
            ip = session_ip
            tricks = set(strategy.split("+"))
            if strategy == "combined":
                # An anti-detect set-up: every account through a new exit
                # (proxy or mobile data) with font and canvas noise, and a
                # window size and language from the few the farmer uses.
                tricks = {"font_noise", "resize_set", "language_set",
                          rng.choice(["ip_proxy", "ip_mobile"])}  # fmt: skip
            if "incognito" in tricks and device.browser in ("Safari", "Firefox") and world.extras:
                # Private windows of these browsers randomize canvas readouts.
                components["extra"]["canvas"] = _digest("noise", rng.random())
            if "ip_proxy" in tricks:
                ip = networks.proxy(rng)
            if "ip_mobile" in tricks:
                ip = carrier.address(rng, world.ipv6_share)
            if "browser_update" in tricks:
                components["browser_version"] = _bumped(components["browser_version"], i)
            if "resize_set" in tricks:
                components["screen_width"], components["screen_height"] = rng.choice(sizes)
            if "language_set" in tricks:
                components["languages"] = list(rng.choice(languages))
            if "resize" in tricks:
                w, h = _resized(rng, device.screen)
                components["screen_width"], components["screen_height"] = w, h
            if "language" in tricks:
                lang = rng.choice(OTHER_LANGUAGES)
                components["languages"] = [lang] if rng.random() < 0.5 else [lang, lang[:2]]
            if "font_noise" in tricks:
                fonts = list(components["fonts"])
                for _ in range(rng.randint(1, 3)):
                    if fonts and rng.random() < 0.5:
                        fonts.pop(rng.randrange(len(fonts)))
                    else:
                        fonts.append(rng.choice(PERSONAL_FONTS))
                components["fonts"] = fonts
                if components["plugins"] or rng.random() < 0.3:
                    components["plugins"] = components["plugins"] + [rng.choice(EXTRA_PLUGINS)]
                if world.extras:
                    components["extra"]["canvas"] = _digest("noise", rng.random())
                    components["extra"]["webgl"] = _digest("noise", rng.random())
            out.append(Event(t, f"{actor}-{i}", components, ip, "abusive", strategy, actor))
        return out


def _resized(rng: random.Random, screen: tuple[int, int]) -> tuple[int, int]:
    """Another window size on the same screen: up to a fifth smaller each way."""
    w, h = screen
    return w - rng.randrange(0, w // 5 + 1, 2), h - rng.randrange(0, h // 5 + 1, 2)


def _bumped(version: str, i: int) -> str:
    """A newer build of the same browser: updates only move forward."""
    parts = version.split(".")
    if len(parts) >= 4:
        parts[3] = str(int(parts[3]) + 3 * (i + 1))
        if i % 4 == 3:
            parts[0] = str(int(parts[0]) + 1)
    else:
        parts[-1] = str(int(parts[-1]) + i + 1)
    return ".".join(parts)


def _where(
    world: World, networks: Networks, rng: random.Random, device: Device, t: float, home: Home
) -> str:
    """Where a person registers from: mobile data, home Wi-Fi or a workplace."""
    if device.kind == "phone":
        if rng.random() < world.wifi_share:
            return home.address(rng, t, world.ipv6_share)
        return networks.carrier(rng).address(rng, world.ipv6_share)
    if rng.random() < 0.08:
        return rng.choice(world.workplaces)
    return home.address(rng, t, world.ipv6_share)


def generate(seed: int, **kwargs: Any) -> Iterator[Event]:
    yield from Population(seed, **kwargs).events()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="-")
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument("--extras", choices=["yes", "no", "world"], default="world")
    parser.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), help="tricks may be joined with '+'"
    )
    args = parser.parse_args()
    try:
        check_strategies(tuple(args.strategies))
    except ValueError as exc:
        parser.error(str(exc))
    extras = None if args.extras == "world" else args.extras == "yes"
    out = sys.stdout if args.out == "-" else open(args.out, "w")  # noqa: SIM115
    for event in generate(
        args.seed, people=args.people, extras=extras, strategies=tuple(args.strategies)
    ):
        out.write(json.dumps(event.as_json()) + "\n")


if __name__ == "__main__":
    main()
