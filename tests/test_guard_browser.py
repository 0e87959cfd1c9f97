"""The guard end to end in real headless Chromium: the demo pages collect
the fingerprint, the server refuses the account over the limit, the page
shows the prompt, and another browser profile is still served. Logging out
or leaving the room frees a slot, and the refused account is then admitted.

Selenium blocks, and the server runs in this test's event loop, so every
browser step runs in a worker thread."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.guard_support import guard_client, web_of
from tests.support import RunningServer, start_server
from tether.guard.v1 import messages_pb2 as pb

pytestmark = pytest.mark.browser

DOCS = Path(__file__).resolve().parent.parent / "docs"
LIMIT = 3  # the demo service's register limit, as in the README
README_NAMES = ["alice", "bob", "carol", "dave"]  # LIMIT + 1 of them


@dataclass(frozen=True)
class Profile:
    name: str
    window: str
    language: str
    user_agent: str = ""


ONE = Profile("one", "1280,900", "en-US")
# Another person's browser: another browser on another system.
OTHER = Profile(
    "other",
    "1024,768",
    "de-DE",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
)
# The first browser in a private window resized to another size, in another
# language: a farmer's trick; still one browser.
DRIFTED = Profile("drifted", "1100,760", "fr-FR")


def _chrome(profile: Profile, data_dir: Path) -> webdriver.Chrome:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    assert chromium and driver, "run scripts/ensure-chromium (Debian chromium, chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={data_dir / profile.name}",
        f"--window-size={profile.window}",
        f"--lang={profile.language}",
        *([f"--user-agent={profile.user_agent}"] if profile.user_agent else []),
    ):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"intl.accept_languages": profile.language})
    return webdriver.Chrome(service=Service(driver), options=options)


@dataclass
class Outcome:
    state: str
    identity: str
    text: str


def _fill(browser: webdriver.Chrome, url: str, account: str, room: str) -> None:
    browser.get(url)
    browser.find_element(By.ID, "account").send_keys(account)
    if room:
        field = browser.find_element(By.ID, "room")
        field.clear()
        field.send_keys(room)


def _outcome(browser: webdriver.Chrome, states: tuple[str, ...]) -> Outcome:
    """Waits until the page settles in one of states; what it then shows."""
    WebDriverWait(browser, 20).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-guard-state") in states
    )
    body = browser.find_element(By.TAG_NAME, "body")
    state = body.get_attribute("data-guard-state") or ""
    shown = "refusal" if state in ("deny", "error") else "result"
    element = browser.find_element(By.ID, shown)
    assert element.is_displayed()
    return Outcome(state, body.get_attribute("data-identity") or "", element.text)


def _submit(browser: webdriver.Chrome, url: str, account: str, room: str = "") -> Outcome:
    _fill(browser, url, account, room)
    browser.find_element(By.ID, "submit").click()
    return _outcome(browser, ("allow", "deny", "error"))


def _release(browser: webdriver.Chrome, url: str, account: str, room: str = "") -> Outcome:
    """Log out, or leave the room: the page's second button."""
    _fill(browser, url, account, room)
    browser.find_element(By.ID, "release").click()
    return _outcome(browser, ("released", "not-held", "error"))


@dataclass
class Demo:
    server: RunningServer
    tmp: Path

    @property
    def base(self) -> str:
        return web_of(self.server).url

    async def run(self, profile: Profile, steps: Callable[[webdriver.Chrome], Any]) -> Any:
        def work() -> Any:
            browser = _chrome(profile, self.tmp)
            try:
                return steps(browser)
            finally:
                browser.quit()

        return await asyncio.to_thread(work)


@pytest.fixture
async def demo(postgres_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Demo]:
    """A server whose demo pages use a service of this test alone."""
    service = f"demo-{secrets.token_hex(4)}"
    server = await start_server(
        database_url=postgres_url,
        redis_url=redis_url,
        data_dir=tmp_path / "data",
        guard_demo_service=service,
    )
    guard = await guard_client(server)
    await guard.set_policy(
        pb.Policy(
            service_id=service,
            register_limit=LIMIT,
            login_limit=LIMIT,
            collaborate_limit=LIMIT,
        )
    )
    yield Demo(server, tmp_path)
    await server.stop()


async def _limit_per_browser(
    demo: Demo, page: str, room: str = "", shot: str = "", freed: str = ""
) -> None:
    """LIMIT accounts are admitted, the next is refused; with freed (what the
    page says once a slot is freed), one account then logs out or leaves, a
    second try frees nothing, and the refused account is admitted."""
    url = f"{demo.base}/demo/{page}"
    prefix = secrets.token_hex(3)
    # The screenshot shows the README's walk-through (the demo server is this
    # test's own, so fixed names meet nobody).
    names = README_NAMES if shot else [f"{prefix}-{i}" for i in range(LIMIT + 1)]
    refused = names[LIMIT]

    def one_browser(browser: webdriver.Chrome) -> list[Outcome]:
        outcomes = [_submit(browser, url, name, room) for name in names]
        if shot:
            browser.save_screenshot(shot)
        if freed:
            outcomes.append(_release(browser, url, names[0], room))
            outcomes.append(_release(browser, url, names[0], room))
            outcomes.append(_submit(browser, url, refused, room))
        return outcomes

    outcomes: list[Outcome] = await demo.run(ONE, one_browser)
    limited = ["allow"] * LIMIT + ["deny"]
    assert [o.state for o in outcomes] == limited + (
        ["released", "not-held", "allow"] * bool(freed)
    )
    assert len({o.identity for o in outcomes}) == 1, "one browser, one identity"
    assert "refused" in outcomes[LIMIT].text.lower()
    if freed:
        assert freed in outcomes[LIMIT + 1].text
        assert outcomes[-1].text.startswith(f"{refused}: ")

    other: Outcome = await demo.run(OTHER, lambda b: _submit(b, url, f"{prefix}-x", room))
    assert other.state == "allow"
    assert other.identity != outcomes[0].identity
    if page == "register":
        # Resized, in another language, from the same network: linked.
        drifted: Outcome = await demo.run(DRIFTED, lambda b: _submit(b, url, f"{prefix}-d", room))
        assert (drifted.state, drifted.identity) == ("deny", outcomes[0].identity)


async def test_one_browser_registers_up_to_the_limit_then_sees_the_prompt(
    demo: Demo, tmp_path: Path
) -> None:
    shot = tmp_path / "guard-refusal.png"
    await _limit_per_browser(demo, "register", shot=str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("TETHER_UPDATE_SCREENSHOTS"):
        shutil.copyfile(shot, DOCS / "guard-refusal.png")


async def test_one_browser_logs_in_up_to_the_limit_and_logging_out_admits_the_next(
    demo: Demo,
) -> None:
    await _limit_per_browser(demo, "login", freed="logged out")


async def test_one_browser_joins_a_room_up_to_the_limit_and_leaving_admits_the_next(
    demo: Demo,
) -> None:
    await _limit_per_browser(demo, "collaborate", room="ktv-7", freed="left the room")
