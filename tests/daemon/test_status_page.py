"""The status page (``GET /``), as an operator sees it: a real headless Chromium on a real
``multibot start`` with a healthy bot and a crash-looping one.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` package
(the ``dev`` extra); it is skipped, saying which is missing, without them. Playwright's own
browser download is never used: the network is closed, and Debian's build is the one we run.
The screenshot it takes goes to ``$MULTIBOT_ARTIFACTS`` (else ``tests/artifacts/``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import REPO, bot_toml
from tests.support import wait_until

try:
    from playwright.async_api import ConsoleMessage, Page, Route, async_playwright, expect
except ImportError:
    pytest.skip(
        "playwright is not installed: `.venv/bin/pip install -e '.[dev]'`",
        allow_module_level=True,
    )

CHROMIUM = Path("/usr/bin/chromium")
#: Flags for running as root on a closed network: no sandbox, no GPU, nothing phoning home.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
STEADY = "tests.daemon.sample_bots:steady"
CRASHER = "tests.daemon.sample_bots:crasher"
CRASH_LOOP = {"backoff_base": 0.05, "backoff_cap": 0.1, "crash_loop_restarts": 2,
              "crash_loop_window": 60.0}  # fmt: skip
#: Long enough for a few 2 s polls of the page.
SEEN = 20_000

pytestmark = [
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.one_redis,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"no {CHROMIUM}: `apt-get install -y chromium`"
    ),
]


def artifacts() -> Path:
    """Where screenshots go: ``$MULTIBOT_ARTIFACTS``, else ``tests/artifacts/``."""
    directory = Path(os.environ.get("MULTIBOT_ARTIFACTS") or REPO / "tests" / "artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class TestStatusPage:
    async def test_shows_the_fleet_live_and_says_when_the_manager_is_gone(
        self, manager_factory: ManagerFactory
    ) -> None:
        """Both bots with their states, the memory bar, the groups; numbers that move when
        events are published; a message when the status needs a token; the last data and a
        'connection lost' banner once the manager stops; no JavaScript errors."""
        bots = bot_toml("steady", STEADY) + bot_toml("broken", CRASHER, restart=CRASH_LOOP)
        manager = await manager_factory(bots, extra="[api]\nhistory_interval = 0.5\n")
        url, admin = await manager.api()
        errors: list[str] = []

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                errors.append(f"console: {message.text}")

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 800})
                page.on("console", console)
                page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
                answer = await page.goto(f"{url}/")
                assert answer is not None and answer.ok
                assert "innerHTML" not in await answer.text()  # data goes in as text only

                await check_fleet(page)
                await check_live(page, url, admin)
                await check_history(page)
                await screenshot(page)
                await check_narrow(page)
                assert errors == [], "\n".join(errors)
                await check_token_needed(page)
                await check_connection_lost(page, manager.terminate)
            finally:
                await browser.close()
        # The last two checks fail fetches on purpose and the browser logs each one; nothing
        # else may be logged.
        failed_fetch = "console: Failed to load resource: "
        assert [e for e in errors if not e.startswith(failed_fetch)] == [], "\n".join(errors)


async def check_fleet(page: Page) -> None:
    """What is on the page once the crasher has given up."""
    await expect(page.locator("#manager-state")).to_have_text("ready", timeout=SEEN)
    await expect(page.locator("#manager-version")).not_to_have_text("—")
    steady = page.locator('#bots tr.bot[data-bot="steady"]')
    broken = page.locator('#bots tr.bot[data-bot="broken"]')
    await expect(steady.locator("td.state")).to_have_text("running", timeout=SEEN)
    await expect(broken.locator("td.state")).to_have_text("failed", timeout=SEEN)
    instance = page.locator('#bots tr.instance[data-bot="steady"][data-instance="0"]')
    await expect(instance.locator("td").nth(2)).to_have_text(re.compile(r"^\d+$"))  # pid
    await expect(instance.locator("td").nth(4)).to_have_text(re.compile(r"^\d+\.\d$"))  # MiB
    await expect(instance.locator("td").nth(5)).to_have_text(re.compile(r"^\d+\.\d s$"))
    await expect(page.locator('#bots tr.instance[data-bot="broken"] td').last).to_have_text(
        "exit 3"
    )
    # What each bot published that the relay has not moved yet: nothing, here.
    await expect(steady.locator("td.outbox")).to_have_text("0")
    # A running bot is green, a failed one red.
    colours = [
        await row.locator("td.state .badge").evaluate("e => getComputedStyle(e).backgroundColor")
        for row in (steady, broken)
    ]
    assert colours == ["rgb(26, 127, 55)", "rgb(207, 34, 46)"]
    bar = await page.locator("#memory-used").bounding_box()
    assert bar is not None and bar["width"] > 0
    assert await page.locator('#memory-used [data-segment="bots"]').count() == 1
    await expect(page.locator("#memory-text")).to_contain_text("MiB")
    groups = page.locator("#groups tbody")
    await expect(groups.locator('tr[data-group="bot-group-steady"]')).to_contain_text("bot")
    await expect(page.locator("#archive-state")).to_have_text("healthy")
    await expect(page.locator("#dlq")).to_have_text("0")
    await expect(page.locator("#banner")).to_be_hidden()


async def check_live(page: Page, url: str, admin: str) -> None:
    """Publishing events moves the page's archive count and throughput, without a reload."""
    before = await number(page, "#archive-archived")
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            f"{url}/v1/events",
            headers={"Authorization": f"Bearer {admin}"},
            json=[{"type": "test.page.tick", "data": {"n": n}} for n in range(50)],
        )
        assert answer.status_code == 202, answer.text

    async def moved() -> bool:
        archived = await number(page, "#archive-archived")
        rate = await number(page, "#throughput")
        return archived >= before + 50 and rate > 0

    await wait_until(moved, 30, "the page to show the 50 events archived and a throughput")


async def check_history(page: Page) -> None:
    """The charts of the last minutes: every one drawn from several samples, the
    throughput's rising off its floor for the events just published, the steady bot's
    group among the lags."""

    async def drawn() -> bool:
        counts = [
            int(await page.locator(f'[data-chart="{name}"] svg').get_attribute("data-points")
                or 0)
            for name in ("throughput", "dead-letters", "memory", "lag")
        ]  # fmt: skip
        return min(counts) >= 3

    await wait_until(drawn, 30, "every chart drawn from three samples or more")
    heights = await page.locator('[data-chart="throughput"] polyline').evaluate(
        "line => line.getAttribute('points').split(' ').map(p => Number(p.split(',')[1]))"
    )
    assert min(heights) < 50, heights  # some sample above zero events/s (the floor is 58)
    legend = page.locator('#lag-legend [data-legend="bot/bot-group-steady"]')
    await expect(legend).to_have_count(1)
    await expect(page.locator('[data-chart="memory"] .now')).to_have_text(re.compile(r"^\d+\.\d$"))


async def number(page: Page, selector: str) -> float:
    """A number shown on the page (0 while it shows "—")."""
    text = (await page.locator(selector).text_content() or "").replace(",", "")
    return float(text) if re.fullmatch(r"\d+(\.\d+)?", text) else 0.0


async def screenshot(page: Page) -> None:
    """The whole page, kept as an artifact of the run."""
    path = artifacts() / "status-page.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


async def check_token_needed(page: Page) -> None:
    """With api.open_status off, /v1/status answers 401: the page says what to set."""

    async def unauthorised(route: Route) -> None:
        await route.fulfill(status=401, json={"error": "GET /v1/status needs a token"})

    await page.route("**/v1/status", unauthorised)
    banner = page.locator("#banner")
    await expect(banner).to_have_attribute("data-kind", "auth", timeout=SEEN)
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("open_status = true")
    await page.unroute("**/v1/status")
    await expect(banner).to_be_hidden(timeout=SEEN)


async def check_narrow(page: Page) -> None:
    """In a phone-sized window nothing sticks out sideways (wide tables scroll inside)."""
    await page.set_viewport_size({"width": 360, "height": 800})
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360
    await page.set_viewport_size({"width": 1100, "height": 800})


async def check_connection_lost(page: Page, stop: Callable[[], Awaitable[int]]) -> None:
    """The manager gone: a banner says so, and the last data stays on the page."""
    assert await stop() == 0
    banner = page.locator("#banner")
    await expect(banner).to_have_attribute("data-kind", "lost", timeout=SEEN)
    await expect(banner).to_contain_text("Connection lost — retrying")
    await expect(page.locator('#bots tr.bot[data-bot="steady"]')).to_be_visible()
