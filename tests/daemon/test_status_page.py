"""The status page (``GET /``), as an operator sees it: a real headless Chromium on a real
``multibot start`` with a healthy bot and a crash-looping one; its event view on bots that
handle, dead-letter and never see an event.

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
from typing import Any

import httpx
import pytest

from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import REPO, bot_toml
from tests.support import wait_until

try:
    from playwright.async_api import Page, Route, expect
except ImportError:
    pytest.skip(
        "playwright is not installed: `.venv/bin/pip install -e '.[dev]'`",
        allow_module_level=True,
    )

from tests.daemon.browser import CHROMIUM, chromium, watched_page

STEADY = "tests.daemon.sample_bots:steady"
CRASHER = "tests.daemon.sample_bots:crasher"
SCRIBE = "tests.daemon.trail_bots:scribe"
GRUMPY = "tests.daemon.trail_bots:grumpy"
NOTES = [{"pattern": "note.*"}]
#: What each group did with each event of the event view's chain.
TRAIL = {"bot-group-scribe": "handled", "bot-group-grumpy": "dead_lettered",
         "bot-group-absent": "not handled"}  # fmt: skip
#: The correlation id of the event view's chain: an id of no event, as a caller may pick.
CORRELATION = "trail-1"
#: Written into the page as text it stays text: no element, no script run.
HOSTILE = "<img src=x onerror=document.title=1><b>bold</b>"
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
        async with chromium() as browser:
            page = await watched_page(browser, errors)
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


class TestEventView:
    async def test_shows_an_event_its_chain_and_what_each_group_did(
        self, manager_factory: ManagerFactory
    ) -> None:
        """An event id typed in shows the event, its chain as an indented tree, and for each
        group: handled, dead-lettered with its DLQ id, or "not handled" (the bot that never
        runs) called out; a link to ``#event=<id>`` opens it; a missing token, an unknown id
        and a manager without an archive each get a message saying what to do."""
        bots = (
            bot_toml("scribe", SCRIBE, subscriptions=NOTES)
            + bot_toml("grumpy", GRUMPY, subscriptions=NOTES)
            + bot_toml("absent", CRASHER, subscriptions=NOTES, restart=CRASH_LOOP)
        )
        manager = await manager_factory(bots)
        url, admin = await manager.api()
        root, child = await recorded_trail(url, admin)
        errors: list[str] = []
        async with chromium() as browser:
            page = await watched_page(browser, errors)
            answer = await page.goto(f"{url}/")
            assert answer is not None and answer.ok
            await page.locator("#event-token").fill(admin)
            await page.locator("#event-query").fill(root["event"]["id"])
            await page.locator("#event-query").press("Enter")
            await check_event(page, root["event"])
            await check_chain(page, root["event"]["id"], child["event"]["id"])
            await check_deliveries(page, root)
            await check_pick_in_chain(page, child)
            await event_screenshot(page)
            await check_narrow(page)
            await check_by_correlation(page, root["event"]["id"])
            link = await watched_page(browser, errors)
            await check_link(link, url, child["event"]["id"], admin)
            await check_lookup_failures(page)
        # The failures checked on purpose are logged as failed loads; nothing else may be.
        failed_fetch = "console: Failed to load resource: "
        assert [e for e in errors if not e.startswith(failed_fetch)] == [], "\n".join(errors)


async def recorded_trail(url: str, admin: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Publish a note; return the deliveries of it and of the note the scribe filed for
    it, once every group's part in both is recorded."""
    auth = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            f"{url}/v1/events",
            headers=auth,
            json={
                "type": "note.posted",
                "data": {"text": HOSTILE, "n": 1},
                "correlation_id": CORRELATION,
            },
        )
        assert answer.status_code == 202, answer.text
        [root_id] = answer.json()["ids"]
        found: dict[str, dict[str, Any]] = {}

        async def recorded() -> bool:
            trace = await client.get(f"{url}/v1/traces/{CORRELATION}", headers=auth)
            if trace.status_code != 200 or trace.json()["events"] != 2:
                return False
            for node in trace.json()["nodes"]:
                answer = await client.get(f"{url}/v1/events/{node['id']}/deliveries", headers=auth)
                assert answer.status_code in (200, 404), answer.text  # 404: not archived yet
                if answer.status_code == 404:
                    return False
                groups = answer.json()["groups"]
                if {g["group"]: g["status"] for g in groups} != TRAIL:
                    return False
                # The outcome record can be archived before the dead letter itself.
                if any(g["status"] == "dead_lettered" and not g["dead_letters"] for g in groups):
                    return False
                found[node["id"]] = answer.json()
            return True

        await wait_until(recorded, 30, "every group's part in the note and its child recorded")
    [child_id] = [event_id for event_id in found if event_id != root_id]
    return found[root_id], found[child_id]


async def check_event(page: Page, event: dict[str, Any]) -> None:
    """The event's fields, and its data as formatted JSON, hostile markup shown as text."""
    fields = page.locator("#event-fields")
    await expect(fields.locator('[data-field="id"]')).to_have_text(event["id"], timeout=SEEN)
    await expect(fields.locator('[data-field="type"]')).to_have_text("note.posted")
    await expect(fields.locator('[data-field="source"]')).to_have_text("api:admin")
    await expect(fields.locator('[data-field="correlation id"]')).to_have_text(CORRELATION)
    await expect(fields.locator('[data-field="time"]')).to_contain_text(event["timestamp"][:19])
    await expect(page.locator("#event-data")).to_contain_text(f'"text": "{HOSTILE}"')
    await expect(page.locator("#event-data")).to_contain_text('\n  "n": 1')
    assert await page.locator("#events img, #events b").count() == 0
    assert await page.title() != "1"
    await expect(page.locator("#event-message")).to_be_empty()
    assert page.url.endswith(f"#event={event['id']}")


async def check_chain(page: Page, root_id: str, child_id: str) -> None:
    """The chain as a tree: the note, and indented under it the note it caused, each with
    its groups' statuses."""
    nodes = page.locator("#chain li")
    await expect(nodes).to_have_count(2)
    await expect(nodes.nth(0)).to_have_attribute("data-id", root_id)
    await expect(nodes.nth(0)).to_have_attribute("data-depth", "0")
    await expect(nodes.nth(0)).to_have_attribute("aria-current", "true")
    await expect(nodes.nth(1)).to_have_attribute("data-id", child_id)
    await expect(nodes.nth(1)).to_have_attribute("data-depth", "1")
    await expect(nodes.nth(1).locator("button")).to_have_text("↳ note.filed")
    outer = await nodes.nth(0).locator("button").bounding_box()
    inner = await nodes.nth(1).locator("button").bounding_box()
    assert outer is not None and inner is not None and inner["x"] > outer["x"] + 10
    for node in (nodes.nth(0), nodes.nth(1)):
        await expect(node.locator('[data-group="bot-group-absent"]')).to_contain_text("not handled")


async def check_deliveries(page: Page, deliveries: dict[str, Any]) -> None:
    """A row per group with its status; the dead letter's DLQ id; "not handled" said in
    words above the table and in red."""
    table = page.locator("#deliveries tbody")
    groups = table.locator("tr.group")
    await expect(groups).to_have_count(3)
    for group, status in TRAIL.items():
        row = table.locator(f'tr.group[data-group="{group}"]')
        await expect(row).to_have_attribute("data-status", status)
        await expect(row.locator("td.state")).to_have_text(status)
    handled = table.locator('tr.outcome[data-group="bot-group-scribe"]')
    await expect(handled).to_have_count(1)
    await expect(handled.locator("td").nth(1)).to_have_text("handled")
    [grumpy] = [g for g in deliveries["groups"] if g["group"] == "bot-group-grumpy"]
    [letter] = grumpy["dead_letters"]
    dead = table.locator('tr.dead-letter[data-group="bot-group-grumpy"]')
    await expect(dead).to_have_attribute("data-dlq", letter["dlq_id"])
    await expect(dead).to_contain_text(f"dead letter {letter['dlq_id']}")
    await expect(dead).to_contain_text("grumpy refuses note.posted")
    missed = page.locator("#deliveries-missed")
    await expect(missed).to_contain_text("Not handled by bot-group-absent")
    colour = await table.locator('tr[data-status="not handled"] td').first.evaluate(
        "e => getComputedStyle(e).color"
    )
    assert colour == "rgb(207, 34, 46)"


async def check_pick_in_chain(page: Page, child: dict[str, Any]) -> None:
    """Picking the caused note in the tree shows it and its deliveries, and links to it."""
    child_id = child["event"]["id"]
    await page.locator(f'#chain li[data-id="{child_id}"] button').click()
    await expect(page.locator('#event-fields [data-field="id"]')).to_have_text(child_id)
    await expect(page.locator('#event-fields [data-field="caused by"]')).to_have_text(
        child["event"]["causation_id"]
    )
    await expect(page.locator("#deliveries-note")).to_contain_text(child_id)
    dead = page.locator('#deliveries tr.dead-letter[data-group="bot-group-grumpy"]')
    await expect(dead).to_contain_text("grumpy refuses note.filed")
    assert page.url.endswith(f"#event={child_id}")


async def check_by_correlation(page: Page, root_id: str) -> None:
    """A correlation id typed in (no event has it as id) shows its chain from the root."""
    await page.locator("#event-query").fill(CORRELATION)
    await page.locator("#event-query").press("Enter")
    await expect(page.locator('#event-fields [data-field="id"]')).to_have_text(root_id)
    await expect(page.locator("#chain li")).to_have_count(2)
    await expect(page.locator("#chain li").first).to_have_attribute("aria-current", "true")
    await expect(page.locator("#deliveries tr.group")).to_have_count(3)


async def event_screenshot(page: Page) -> None:
    """The event view, kept as an artifact of the run."""
    path = artifacts() / "status-page-event.png"
    await page.locator("#events").screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def check_link(page: Page, url: str, event_id: str, admin: str) -> None:
    """A link to ``#event=<id>`` opens the view at once; without a token it says the read
    scope is needed, and with one typed in it shows the event."""
    await page.goto(f"{url}/#event={event_id}")
    await expect(page.locator("#event-query")).to_have_value(event_id)
    message = page.locator("#event-message")
    await expect(message).to_have_attribute("data-kind", "error", timeout=SEEN)
    await expect(message).to_contain_text("needs a token with the read scope")
    await page.locator("#event-token").fill(admin)
    await page.locator("#event-form button").click()
    await expect(page.locator('#event-fields [data-field="id"]')).to_have_text(
        event_id, timeout=SEEN
    )
    await expect(message).to_be_empty()


async def check_lookup_failures(page: Page) -> None:
    """An id nothing has says archiving takes a moment; a manager without an archive says
    so."""
    message = page.locator("#event-message")
    await page.locator("#event-query").fill("no-such-event")
    await page.locator("#event-query").press("Enter")
    await expect(message).to_contain_text("Archiving takes a moment", timeout=SEEN)
    await expect(message).to_have_attribute("data-kind", "error")
    await expect(page.locator("#event-view")).to_be_hidden()

    async def no_archive(route: Route) -> None:
        await route.fulfill(status=503, json={"error": "this manager keeps no archive"})

    await page.route("**/v1/events/**", no_archive)
    await page.locator("#event-query").press("Enter")
    await expect(message).to_contain_text("this manager keeps none", timeout=SEEN)
    await page.unroute("**/v1/events/**")
