"""The API's documentation page (``GET /docs``) in a real headless Chromium that may reach
the manager and nothing else, as on a closed network.

Skipped, saying which is missing, without Debian's ``chromium`` or the ``playwright``
package, as the status page's test is (whose browser flags it shares). The screenshot goes
to ``$MULTIBOT_ARTIFACTS`` (else ``tests/artifacts/``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.daemon.conftest import ManagerFactory

try:
    from playwright.async_api import Page, Route, expect
except ImportError:
    pytest.skip(
        "playwright is not installed: `.venv/bin/pip install -e '.[dev]'`",
        allow_module_level=True,
    )

from tests.daemon.browser import CHROMIUM, chromium, watched_page
from tests.daemon.test_status_page import artifacts

#: Long enough for Swagger UI to fetch and render the OpenAPI document.
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


class TestDocsPage:
    async def test_renders_and_calls_the_api_with_only_the_manager_reachable(
        self, manager_factory: ManagerFactory
    ) -> None:
        """Swagger UI renders the operations with every request going to the manager (any
        other host is refused and would be listed); a call tried from the page gets 401
        until a token is given through "Authorize", then 200; no JavaScript errors."""
        manager = await manager_factory("", extra="[api]\nopen_status = false\n")
        url, admin = await manager.api()
        here = urlsplit(url).netloc
        elsewhere: list[str] = []
        errors: list[str] = []

        async def closed_network(route: Route) -> None:
            if urlsplit(route.request.url).netloc == here:
                await route.continue_()
            else:
                elsewhere.append(route.request.url)
                await route.abort("internetdisconnected")

        async with chromium() as browser:
            page = await watched_page(browser, errors)
            await page.route("**/*", closed_network)
            answer = await page.goto(f"{url}/docs")
            assert answer is not None and answer.ok

            await check_rendered(page)
            await page.screenshot(path=str(artifacts() / "docs-page.png"), full_page=True)
            # The anonymous call's 401 is logged by the browser; nothing else may be.
            await check_try_it_out(page, admin)
        assert elsewhere == [], f"the page reached beyond the manager: {elsewhere}"
        failed_fetch = "console: Failed to load resource: "
        assert [e for e in errors if not e.startswith(failed_fetch)] == [], "\n".join(errors)
        assert "Traceback" not in manager.log()


async def check_rendered(page: Page) -> None:
    """The API's title, every tag's operations, and the bearer-token button."""
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("multibot", timeout=SEEN)
    for path in ("/v1/events", "/v1/bots", "/v1/dlq", "/v1/status", "/healthz"):
        summary = page.locator(f'.opblock-summary-path[data-path="{path}"]')
        await expect(summary.first).to_be_visible()
    assert await page.locator(".opblock").count() >= 15
    await expect(page.locator(".auth-wrapper button.authorize")).to_be_visible()
    # The stylesheet applied (the operations' method badges are coloured), not just loaded.
    badge = page.locator(".opblock-get .opblock-summary-method").first
    colour = await badge.evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour not in ("rgba(0, 0, 0, 0)", "transparent"), colour


async def check_try_it_out(page: Page, token: str) -> None:
    """GET /v1/bots from the page: 401 without a token, 200 once authorised."""
    operation = page.locator("#operations-fleet-bots_v1_bots_get")
    await operation.locator(".opblock-summary").click()
    await operation.locator("button.try-out__btn").click()
    status = operation.locator(".live-responses-table .response .response-col_status")
    await operation.locator("button.execute").click()
    await expect(status).to_have_text("401", timeout=SEEN)

    await page.locator(".auth-wrapper button.authorize").click()
    await page.locator("#auth-bearer-value").fill(token)
    await page.locator(".auth-container button.modal-btn.authorize").click()
    await page.locator(".auth-container button.btn-done").click()
    await operation.locator("button.execute").click()
    await expect(status).to_have_text("200", timeout=SEEN)
