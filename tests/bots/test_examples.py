"""The example bots coordinating on a real private Redis: replies, shared users, roles, load."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from bots import chatbot, shared_users
from bots.chatbot import HANDOVER, LOAD_OFFER, ROLE_ASSIGNED, ChatBot, RoleAssigned
from bots.shared_users import WINDOW, SharedUserDetector
from bus import BusClient, Event, EventType, SchemaError, UserMessage
from tests.conftest import BusFactory
from tests.support import running, wait_until

pytestmark = pytest.mark.redis

RECEIVED, SENT = EventType.MESSAGE_RECEIVED, EventType.MESSAGE_SENT
SHARED, BALANCE = EventType.SHARED_USER_DETECTED, EventType.LOAD_BALANCE_REQUIRED


async def caught_up(client: BusClient, type_: str) -> bool:
    """Whether the client's group has handled and acked everything on ``type_``'s stream."""
    stream = client.keys.stream(client.router.route(type_))
    info: Any = await client.redis.xinfo_stream(stream)
    groups: Any = await client.redis.xinfo_groups(stream)
    group = next(g for g in groups if g["name"] == client.group)
    return bool(group["pending"] == 0 and group["last-delivered-id"] == info["last-generated-id"])


async def settle(type_: str, *clients: BusClient) -> None:
    """Wait, client after client, until each has handled everything on ``type_``'s stream.

    List the bots first and the probe last: then whatever the bots published while handling
    has reached the probe too.
    """
    for client in clients:
        await wait_until(functools.partial(caught_up, client, type_), what=f"{client!r} caught up")


async def recorder(bus_factory: BusFactory) -> tuple[BusClient, list[Event]]:
    """A probe client recording every event of every stream."""
    probe = await bus_factory("probe")
    seen: list[Event] = []

    @probe.subscribe("#")
    async def record(event: Event) -> None:
        seen.append(event)

    return probe, seen


@dataclasses.dataclass
class Fleet:
    """Bots running on one Redis, a probe recording every event, and a users' publisher."""

    bots: dict[str, BusClient]
    users: BusClient
    probe: BusClient
    seen: list[Event]

    async def say(self, user: str, bot: str, text: str = "hi") -> str:
        """Publish a user's message to a bot; return the event id."""
        data = {"user_id": user, "bot_id": bot, "text": text}
        return await self.users.publish(RECEIVED, data, key=user)

    def of(self, type_: str, **data: Any) -> list[Event]:
        """Recorded events of a type whose data has these values."""
        return [
            e
            for e in self.seen
            if e.type == type_ and all(e.data.get(k) == v for k, v in data.items())
        ]

    def caused_by(self, event_id: str) -> list[Event]:
        """Recorded events published while handling ``event_id``."""
        return [e for e in self.seen if e.causation_id == event_id]

    async def settle(self, type_: str, *bots: str) -> None:
        """Wait until these bots, then the probe, handled everything on ``type_``'s stream."""
        await settle(type_, *(self.bots[b] for b in bots), self.probe)


@pytest.fixture
async def fleet(bus_factory: BusFactory) -> AsyncIterator[Fleet]:
    """greeter and matcher chat bots and the shared-user detector, running."""
    bots = {name: await bus_factory(name) for name in ("greeter", "matcher", "shared")}
    ChatBot(bots["greeter"]).install()
    ChatBot(bots["matcher"]).install()
    SharedUserDetector(bots["shared"]).install()
    probe, seen = await recorder(bus_factory)
    users = await bus_factory("users")
    async with running(*bots.values(), probe):
        yield Fleet(bots, users, probe, seen)


async def share(fleet: Fleet, user: str) -> None:
    """Make ``user`` talk to matcher and greeter; wait until both bots took their role."""
    await fleet.say(user, "matcher")
    await fleet.say(user, "greeter")
    await wait_until(lambda: len(fleet.of(ROLE_ASSIGNED, user_id=user)) == 2, what="roles")


class TestReplies:
    async def test_bot_answers_only_its_own_messages(self, fleet: Fleet) -> None:
        """A message to greeter gets one reply, from greeter, keyed by the user."""
        msg = await fleet.say("u1", "greeter", "good morning")
        await wait_until(lambda: bool(fleet.caused_by(msg)), what="a reply")
        await fleet.settle(RECEIVED, "greeter", "matcher")
        (reply,) = fleet.caused_by(msg)
        assert (reply.type, reply.source, reply.key) == (SENT, "greeter", "u1")
        assert reply.data["user_id"] == "u1" and "good morning" in reply.data["text"]


class TestSharedUserDetection:
    async def test_user_of_two_bots_is_announced_once(self, fleet: Fleet) -> None:
        """Messages to greeter and matcher give one announcement naming both, sorted."""
        for bot in ("matcher", "greeter", "matcher", "greeter"):
            await fleet.say("u1", bot)
        await wait_until(lambda: bool(fleet.of(SHARED)), what="the announcement")
        await fleet.settle(RECEIVED, "shared")
        await fleet.settle(SHARED)
        (shared,) = fleet.of(SHARED)
        assert shared.data == {"user_id": "u1", "bot_ids": ["greeter", "matcher"]}
        assert (shared.source, shared.key) == ("shared", "u1")

    async def test_user_of_one_bot_is_not_announced(self, fleet: Fleet) -> None:
        """Several messages to the same bot make no shared user."""
        for _ in range(3):
            await fleet.say("u2", "greeter")
        await fleet.settle(RECEIVED, "shared")
        await fleet.settle(SHARED)
        assert fleet.of(SHARED) == []

    async def test_messages_older_than_the_window_do_not_count(self, fleet: Fleet) -> None:
        """A message to another bot longer ago than the window does not make a shared user."""
        old = fleet.users.event(RECEIVED, {"user_id": "u3", "bot_id": "greeter"}, key="u3")
        old = dataclasses.replace(old, timestamp=old.timestamp - timedelta(seconds=WINDOW + 60))
        await fleet.users.publish_many([old])
        await fleet.say("u3", "matcher")
        await fleet.settle(RECEIVED, "shared")
        await fleet.settle(SHARED)
        assert fleet.of(SHARED) == []
        await fleet.say("u3", "greeter")
        await wait_until(lambda: bool(fleet.of(SHARED, user_id="u3")), what="the announcement")

    async def test_replicas_announce_each_user_once(self, bus_factory: BusFactory) -> None:
        """Two replicas of the detector, sharing the load, announce each shared user once."""
        replicas = [await bus_factory("shared", instance=n) for n in (0, 1)]
        for replica in replicas:
            SharedUserDetector(replica).install()
        probe, seen = await recorder(bus_factory)
        users = await bus_factory("users")
        async with running(*replicas, probe):
            await users.publish_many(
                [
                    (RECEIVED, {"user_id": f"u{n}", "bot_id": bot})
                    for n in range(5)
                    for bot in ("greeter", "matcher", "greeter", "matcher")
                ]
            )
            await wait_until(lambda: len([e for e in seen if e.type == SHARED]) >= 5)
            await settle(RECEIVED, replicas[0])
            await settle(SHARED, probe)
        announced = sorted(e.data["user_id"] for e in seen if e.type == SHARED)
        assert announced == [f"u{n}" for n in range(5)]

    async def test_replicas_seeing_one_bot_each_announce_once(
        self, bus_factory: BusFactory
    ) -> None:
        """Replicas that each saw a different bot of the user still announce, exactly once."""
        r0, r1 = [await bus_factory("shared", instance=n) for n in (0, 1)]
        users = await bus_factory("users")
        d0, d1 = SharedUserDetector(r0), SharedUserDetector(r1)

        def message(bot: str) -> tuple[Event, UserMessage]:
            event = users.event(RECEIVED, {"user_id": 7, "bot_id": bot}, key="7")
            return event, UserMessage.model_validate(event.data)

        await asyncio.gather(
            d0.on_message(*message("greeter")),
            d1.on_message(*message("matcher")),
            d0.on_message(*message("matcher")),
            d1.on_message(*message("greeter")),
        )
        announced = [e async for e in users.replay(SHARED, since="0")]
        assert [e.data for e in announced] == [{"user_id": 7, "bot_ids": ["greeter", "matcher"]}]


class TestRoles:
    async def test_smallest_bot_id_is_primary(self, fleet: Fleet) -> None:
        """Both bots take a role for the shared user: greeter primary, matcher secondary."""
        await share(fleet, "u1")
        roles = {(e.source, e.data["role"], e.data["primary"]) for e in fleet.of(ROLE_ASSIGNED)}
        assert roles == {("greeter", "primary", "greeter"), ("matcher", "secondary", "greeter")}
        assert {e.data["bot_id"] for e in fleet.of(ROLE_ASSIGNED)} == {"greeter", "matcher"}

    async def test_secondary_hands_the_user_to_the_primary(self, fleet: Fleet) -> None:
        """After the roles, matcher no longer answers the user: greeter answers for it."""
        await share(fleet, "u1")
        text = "any match for me?"
        msg = await fleet.say("u1", "matcher", text)
        await wait_until(lambda: bool(fleet.caused_by(msg)), what="the handover")
        await fleet.settle(RECEIVED, "matcher")
        (handover,) = fleet.caused_by(msg)  # and no reply from matcher
        assert (handover.type, handover.source) == (HANDOVER, "matcher")
        assert handover.data == {
            "user_id": "u1", "from_bot": "matcher", "to_bot": "greeter", "text": text,
        }  # fmt: skip
        await wait_until(lambda: bool(fleet.caused_by(handover.id)), what="the primary's answer")
        (reply,) = fleet.caused_by(handover.id)
        assert (reply.type, reply.source, reply.data["user_id"]) == (SENT, "greeter", "u1")
        assert "matcher passed on" in reply.data["text"]
        assert reply.correlation_id == handover.correlation_id == msg  # one traceable chain

    async def test_primary_keeps_answering(self, fleet: Fleet) -> None:
        """The primary still answers the shared user's messages itself."""
        await share(fleet, "u1")
        msg = await fleet.say("u1", "greeter", "still there?")
        await wait_until(lambda: bool(fleet.caused_by(msg)), what="a reply")
        await fleet.settle(RECEIVED, "greeter")
        (reply,) = fleet.caused_by(msg)
        assert (reply.type, reply.source) == (SENT, "greeter")

    async def test_other_users_are_unaffected(self, fleet: Fleet) -> None:
        """A user shared by the bots does not change how matcher treats other users."""
        await share(fleet, "u1")
        msg = await fleet.say("u2", "matcher")
        await wait_until(lambda: bool(fleet.caused_by(msg)), what="a reply")
        await fleet.settle(RECEIVED, "matcher")
        assert [(e.type, e.source) for e in fleet.caused_by(msg)] == [(SENT, "matcher")]


class TestLoadBalance:
    async def test_other_bots_offer_help(self, fleet: Fleet) -> None:
        """A bot that needs load taken off gets an offer from the other chat bot only."""
        await fleet.users.publish(BALANCE, {"reason": "lag 500", "bot_id": "greeter"})
        await wait_until(lambda: bool(fleet.of(LOAD_OFFER)), what="an offer")
        await fleet.settle(BALANCE, "greeter", "matcher")
        (offer,) = fleet.of(LOAD_OFFER)
        assert offer.data == {"from_bot": "matcher", "to_bot": "greeter", "reason": "lag 500"}
        assert (offer.source, offer.key) == ("matcher", "greeter")

    async def test_no_offer_without_a_bot_named(self, fleet: Fleet) -> None:
        """A balance event about a group, not a bot, gets no offer."""
        await fleet.users.publish(BALANCE, {"reason": "lag", "group": "bot-group-x"})
        await fleet.settle(BALANCE, "greeter", "matcher")
        assert fleet.of(LOAD_OFFER) == []


class TestEntryPoints:
    async def test_mains_subscribe_and_run_until_stopped(self, bus_factory: BusFactory) -> None:
        """Each bot's main(bus) subscribes, consumes, and returns when the client stops."""
        chat, detector = await bus_factory("greeter"), await bus_factory("shared")
        tasks = [
            asyncio.create_task(chatbot.main(chat)),
            asyncio.create_task(shared_users.main(detector)),
        ]
        await asyncio.gather(chat.wait_ready(), detector.wait_ready())
        assert [s.pattern.text for s in chat.subscriptions] == [RECEIVED, SHARED, HANDOVER, BALANCE]
        assert [s.pattern.text for s in detector.subscriptions] == [RECEIVED]
        await asyncio.gather(chat.stop(), detector.stop())
        await asyncio.wait_for(asyncio.gather(*tasks), 5)

    async def test_published_types_have_schemas(self, bus_factory: BusFactory) -> None:
        """The chat bot registers the schemas of what it publishes; bad data is refused."""
        bus = await bus_factory("greeter")
        ChatBot(bus).install()
        assert bus.schemas.get(ROLE_ASSIGNED) is RoleAssigned
        bad = {"user_id": 1, "bot_id": "greeter", "role": "boss", "primary": "greeter"}
        with pytest.raises(SchemaError, match="role"):
            await bus.publish(ROLE_ASSIGNED, bad)
