"""The example bots, each on its own through bus.testing, as a bot author would test them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest

from bots import chatbot, shared_users
from bots.chatbot import HANDOVER, LOAD_OFFER, ROLE_ASSIGNED
from bots.shared_users import WINDOW
from bus import BusClient, EventType, SchemaError
from bus.testing import TestBus

pytestmark = pytest.mark.redis

RECEIVED, SENT = EventType.MESSAGE_RECEIVED, EventType.MESSAGE_SENT
SHARED, BALANCE = EventType.SHARED_USER_DETECTED, EventType.LOAD_BALANCE_REQUIRED


async def say(bus: TestBus, user: str, bot: str, text: str = "hi") -> str:
    """Publish a user's message to ``bot``; its event id."""
    return await bus.publish(RECEIVED, {"user_id": user, "bot_id": bot, "text": text}, key=user)


@asynccontextmanager
async def running(
    bot_id: str, main: Callable[[BusClient], Awaitable[None]]
) -> AsyncIterator[TestBus]:
    """A TestBus running ``main`` as ``bot_id``."""
    async with TestBus(bot_id) as bus:
        await bus.start(main)
        yield bus


@pytest.fixture
async def greeter() -> AsyncIterator[TestBus]:
    """The chat bot running as greeter."""
    async with running("greeter", chatbot.main) as bus:
        yield bus


@pytest.fixture
async def matcher() -> AsyncIterator[TestBus]:
    """The chat bot running as matcher."""
    async with running("matcher", chatbot.main) as bus:
        yield bus


@pytest.fixture
async def detector() -> AsyncIterator[TestBus]:
    """The shared-user detector."""
    async with running("shared", shared_users.main) as bus:
        yield bus


class TestChatBotReplies:
    async def test_answers_its_own_users(self, greeter: TestBus) -> None:
        """A message to greeter gets greeter's answer, keyed by the user, in the same chain."""
        msg = await say(greeter, "u1", "greeter", "good morning")
        reply = await greeter.wait_for(SENT, caused_by=msg)
        assert (reply.source, reply.key, reply.correlation_id) == ("greeter", "u1", msg)
        assert reply.data == {
            "user_id": "u1",
            "bot_id": "greeter",
            "text": "Hello u1, welcome! (you said: good morning)",
        }

    async def test_ignores_messages_to_other_bots(self, greeter: TestBus) -> None:
        """A message to matcher gets nothing from greeter."""
        await say(greeter, "u1", "matcher")
        await greeter.idle()
        assert await greeter.published(SENT) == []

    async def test_each_bot_has_its_own_opener(self) -> None:
        """matcher answers as matcher; a bot with no opener of its own introduces itself."""
        for bot, opener in (
            ("matcher", "Let me find you a match, 7."),
            ("helper", "helper here, 7."),
        ):
            async with running(bot, chatbot.main) as bus:
                await bus.publish(RECEIVED, {"user_id": 7, "bot_id": bot, "text": "yo"})
                reply = await bus.wait_for(SENT, source=bot)
                assert reply.data["text"] == f"{opener} (you said: yo)"


class TestChatBotRoles:
    async def test_smallest_bot_id_takes_the_primary_role(self, greeter: TestBus) -> None:
        """Named with matcher, greeter (the smallest id) becomes primary and says so."""
        shared = await greeter.publish(SHARED, {"user_id": "u1", "bot_ids": ["matcher", "greeter"]})
        role = await greeter.wait_for(ROLE_ASSIGNED, caused_by=shared)
        assert role.data == {
            "user_id": "u1",
            "bot_id": "greeter",
            "role": "primary",
            "primary": "greeter",
        }
        assert role.key == "u1"

    async def test_primary_keeps_answering(self, greeter: TestBus) -> None:
        """The primary answers the shared user's messages itself."""
        await greeter.publish(SHARED, {"user_id": "u1", "bot_ids": ["greeter", "matcher"]})
        await greeter.wait_for(ROLE_ASSIGNED)
        msg = await say(greeter, "u1", "greeter")
        assert (await greeter.wait_for(SENT, caused_by=msg)).source == "greeter"
        await greeter.idle()
        assert await greeter.published(HANDOVER) == []

    async def test_secondary_hands_the_user_over(self, matcher: TestBus) -> None:
        """matcher, secondary, passes the user's message to greeter instead of answering."""
        await matcher.publish(SHARED, {"user_id": "u1", "bot_ids": ["greeter", "matcher"]})
        role = await matcher.wait_for(ROLE_ASSIGNED)
        assert (role.data["role"], role.data["primary"]) == ("secondary", "greeter")
        text = "any match for me?"
        msg = await say(matcher, "u1", "matcher", text)
        handover = await matcher.wait_for(HANDOVER, caused_by=msg)
        assert (handover.source, handover.key) == ("matcher", "u1")
        assert handover.data == {
            "user_id": "u1", "from_bot": "matcher", "to_bot": "greeter", "text": text,
        }  # fmt: skip
        await matcher.idle()
        assert await matcher.published(SENT) == []

    async def test_secondary_still_answers_other_users(self, matcher: TestBus) -> None:
        """Being secondary for one user changes nothing for the others."""
        await matcher.publish(SHARED, {"user_id": "u1", "bot_ids": ["greeter", "matcher"]})
        await matcher.wait_for(ROLE_ASSIGNED)
        msg = await say(matcher, "u2", "matcher")
        assert (await matcher.wait_for(SENT, caused_by=msg)).data["user_id"] == "u2"

    async def test_primary_answers_what_is_handed_over(self, greeter: TestBus) -> None:
        """A handover addressed to greeter is answered, saying who passed it on."""
        handover = {"user_id": "u1", "from_bot": "matcher", "to_bot": "greeter", "text": "hey"}
        event_id = await greeter.publish(HANDOVER, handover, key="u1")
        reply = await greeter.wait_for(SENT, caused_by=event_id)
        assert reply.data["text"] == "Hello u1, welcome! (matcher passed on: hey)"

    async def test_ignores_what_is_not_its_own(self, greeter: TestBus) -> None:
        """Sharing among other bots, and handovers to another bot, get nothing from greeter."""
        await greeter.publish(SHARED, {"user_id": "u1", "bot_ids": ["helper", "matcher"]})
        handover = {"user_id": "u1", "from_bot": "matcher", "to_bot": "helper", "text": "hey"}
        await greeter.publish(HANDOVER, handover)
        await greeter.idle()
        assert await greeter.published("#", source="greeter") == []

    async def test_what_it_publishes_has_a_schema(self, greeter: TestBus) -> None:
        """The bot registers its schemas: a bad role announcement is refused at publish."""
        bad = {"user_id": 1, "bot_id": "greeter", "role": "boss", "primary": "greeter"}
        with pytest.raises(SchemaError, match="role"):
            await greeter.publish(ROLE_ASSIGNED, bad)


class TestChatBotLoad:
    async def test_offers_help_to_another_bot(self, matcher: TestBus) -> None:
        """A bot needing load taken off gets matcher's offer, keyed by that bot."""
        need = await matcher.publish(BALANCE, {"reason": "lag 500", "bot_id": "greeter"})
        offer = await matcher.wait_for(LOAD_OFFER, caused_by=need)
        assert offer.data == {"from_bot": "matcher", "to_bot": "greeter", "reason": "lag 500"}
        assert (offer.source, offer.key) == ("matcher", "greeter")

    async def test_no_offer_to_itself_or_to_no_bot(self, matcher: TestBus) -> None:
        """Balance events about matcher itself, or about a group only, get no offer."""
        await matcher.publish(BALANCE, {"reason": "lag", "bot_id": "matcher"})
        await matcher.publish(BALANCE, {"reason": "lag", "group": "bot-group-x"})
        await matcher.idle()
        assert await matcher.published(LOAD_OFFER) == []


class TestSharedUserDetector:
    async def test_user_of_two_bots_is_announced_once(self, detector: TestBus) -> None:
        """Messages to matcher and greeter give one announcement, bots sorted, keyed by user."""
        for bot in ("matcher", "greeter", "matcher", "greeter"):
            await say(detector, "u1", bot)
        shared = await detector.wait_for(SHARED)
        assert shared.data == {"user_id": "u1", "bot_ids": ["greeter", "matcher"]}
        assert (shared.source, shared.key) == ("shared", "u1")
        await detector.idle()
        assert len(await detector.published(SHARED)) == 1

    async def test_user_of_one_bot_is_not_announced(self, detector: TestBus) -> None:
        """Several messages to one bot make no shared user."""
        for _ in range(3):
            await say(detector, "u1", "greeter")
        await detector.idle()
        assert await detector.published(SHARED) == []

    async def test_a_new_set_of_bots_is_announced_again(self, detector: TestBus) -> None:
        """A third bot joining the user's bots makes a second announcement, naming all three."""
        await say(detector, "u1", "greeter")
        await say(detector, "u1", "matcher")
        await detector.wait_for(SHARED)
        await say(detector, "u1", "helper")
        three = await detector.wait_for(SHARED, {"bot_ids": {"contains": "helper"}})
        assert three.data["bot_ids"] == ["greeter", "helper", "matcher"]

    async def test_users_are_told_apart(self, detector: TestBus) -> None:
        """Two users each talking to one bot are no shared user; each sharing one is."""
        await say(detector, "u1", "greeter")
        await say(detector, "u2", "matcher")
        await detector.idle()
        assert await detector.published(SHARED) == []
        await say(detector, "u2", "greeter")
        assert (await detector.wait_for(SHARED)).data["user_id"] == "u2"

    async def test_messages_older_than_the_window_do_not_count(self, detector: TestBus) -> None:
        """A message to another bot longer ago than the window makes no shared user."""
        old = detector.event(RECEIVED, {"user_id": "u3", "bot_id": "greeter"}, key="u3")
        old = dataclasses.replace(old, timestamp=old.timestamp - timedelta(seconds=WINDOW + 60))
        await detector.publish_many([old])
        await say(detector, "u3", "matcher")
        await detector.idle()
        assert await detector.published(SHARED) == []
        await say(detector, "u3", "greeter")
        assert (await detector.wait_for(SHARED, {"user_id": "u3"})).data["bot_ids"] == [
            "greeter",
            "matcher",
        ]
