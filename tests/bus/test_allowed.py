"""Declared subscriptions (``allowed=``): only events they match reach a bot's handlers."""

from __future__ import annotations

import pytest

from bus import BusClient, Event
from bus.settings import BusSettings
from bus.subscription import Allowed
from tests.support import running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments]


class TestAllowed:
    def test_matches_pattern_and_conditions(self) -> None:
        """An event must match a declared pattern and that declaration's conditions."""
        allowed = Allowed([("user.#", {"lang": "en"}), ("bot.lifecycle.*", {})])
        assert allowed.allows(Event("user.message.received", {"lang": "en"}, "t"))
        assert not allowed.allows(Event("user.message.received", {"lang": "ru"}, "t"))
        assert allowed.allows(Event("bot.lifecycle.started", {"bot_id": "x"}, "t"))
        assert not allowed.allows(Event("profile.girl.created", {"lang": "en"}, "t"))

    async def test_client_drops_what_the_config_does_not_declare(self, redis_url: str) -> None:
        """Handlers see only declared events; the rest is acked, not left pending."""
        settings = BusSettings.model_validate(
            {"redis_url": redis_url, "consumer": {"block_ms": 200, "start_id": "0"}}
        )
        seen: list[str] = []
        allowed = Allowed([("note.#", {"lang": "en"})])
        async with BusClient("narrow", settings=settings, allowed=allowed) as bus:

            @bus.subscribe("#")
            async def record(event: Event) -> None:
                seen.append(event.data["n"])

            async with running(bus):
                await bus.publish("note.added", {"n": "en", "lang": "en"})
                await bus.publish("note.added", {"n": "ru", "lang": "ru"})
                await bus.publish("memo.added", {"n": "memo", "lang": "en"})
                await bus.publish("note.added", {"n": "last", "lang": "en"})
                await wait_until(lambda: "last" in seen, 10, "the last declared event")

                async def nothing_pending() -> bool:
                    for stream in ("bot",):
                        info = await bus.redis.xpending(bus.keys.stream(stream), bus.group)
                        if info["pending"]:
                            return False
                    return True

                await wait_until(nothing_pending, 10, "every entry acked")
        assert seen == ["en", "last"]
