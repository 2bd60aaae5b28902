"""The outbox relay: what a bot appends to its outbox reaches the stream the manager's routing
table names, with the bot as its source, exactly once, whatever bytes the bot wrote."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import BusClient, Event
from bus.connection import is_cluster
from bus.dlq import DEAD_LETTER_MARK, DeadLetterReason, DeadLetters
from bus.errors import DeadLetterRetryError
from bus.keys import Keys, group_name
from bus.outbox import MAX_FIELDS, OutboxRelay
from bus.routing import Router
from manager.embedded.redis_server import RedisServer
from tests.conftest import BusFactory
from tests.support import redis_client, running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments]

KEYS = Keys()
#: The manager's table; a bot's own settings may say otherwise, and are not asked.
ROUTES = {"user": "user", "bot": "bot", "user.secret": "vault"}
ROUTER = Router(ROUTES, "bot")


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A connection that keeps bytes as bytes (entries need not be UTF-8)."""
    async with redis_client(redis_url) as client:
        yield client


def relay_for(redis: Redis, *bots: str, batch: int = 500) -> OutboxRelay:
    return OutboxRelay(redis, KEYS, ROUTER, lambda: bots, batch=batch, block=0.1)


@pytest.fixture
async def relaying(redis: Redis) -> AsyncIterator[OutboxRelay]:
    """The relay of bots "alice" and "bob", running in the background."""
    relay = relay_for(redis, "alice", "bob")
    task = asyncio.create_task(relay.run())
    yield relay
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def entries(redis: Redis, name: str) -> list[dict[str, Any]]:
    rows: Any = await redis.xrange(KEYS.stream(name))
    return [fields for _, fields in rows]


async def dead_letter(bot: BusClient, claimed_group: str | None = None) -> str:
    """A dead letter of event ``e1`` ("boom"), written by ``bot`` to its outbox, naming
    ``claimed_group`` (default: its own) as the group that failed."""
    return await bot.dlq.add(
        fields={"id": "e1", "type": "user.login.done"},
        reason=DeadLetterReason.HANDLER_ERROR,
        error="boom",
        stream=KEYS.stream("user"),
        entry_id="1-1",
        group=claimed_group or group_name(bot.bot_id),
        consumer=f"{bot.bot_id}-0",
    )


async def empty(redis: Redis, bot: str) -> bool:
    return int(await redis.xlen(KEYS.outbox(bot))) == 0


class TestRelay:
    async def test_events_reach_their_stream_with_the_bot_as_source(
        self, redis: Redis, relaying: OutboxRelay, bus_factory: BusFactory
    ) -> None:
        """A bot claiming to be the manager, with routes of its own, still publishes as
        itself, to the stream the manager's table names, in order."""
        alice = await bus_factory("alice", outbox=True, routes={"user": "bot"})
        forged = alice.event("user.login.done", {"n": 0}, source="manager")
        ids = [*await alice.publish_many([forged]), await alice.publish("user.login.done", {})]
        ids.append(await alice.publish("user.secret.kept", {}))
        await wait_until(lambda: empty(redis, "alice"), what="the outbox relayed")
        user = await entries(redis, "user")
        assert [(e["id"], e["source"]) for e in user] == [(ids[0], "alice"), (ids[1], "alice")]
        assert [e["id"] for e in await entries(redis, "vault")] == [ids[2]]
        assert await entries(redis, "bot") == []
        assert relaying.moved == 3

    async def test_consumers_see_the_relayed_source(
        self, relaying: OutboxRelay, bus_factory: BusFactory
    ) -> None:
        """End to end: a consumer of another bot handles the event with source = publisher."""
        alice = await bus_factory("alice", outbox=True)
        bob = await bus_factory("bob", outbox=True)
        seen: list[Event] = []

        @bob.subscribe("user.#")
        async def handle(event: Event) -> None:
            seen.append(event)

        async with running(bob):
            await alice.publish_many([alice.event("user.login.done", {}, source="cli")])
            await wait_until(lambda: len(seen) == 1, what="bob handled it")
        assert seen[0].source == "alice"

    async def test_a_reused_event_id_cannot_make_an_idempotent_handler_skip_the_real_one(
        self, relaying: OutboxRelay, bus_factory: BusFactory
    ) -> None:
        """Bob copies the id of an event Alice is about to send and publishes first: both
        are handled, since run-once markers are keyed by the id and the relayed source; a
        publisher's own retry of an id is still skipped."""
        alice = await bus_factory("alice", outbox=True)
        bob = await bus_factory("bob", outbox=True)
        victim = await bus_factory("victim")
        seen: list[tuple[str, str]] = []

        @victim.subscribe("user.#", idempotent_ttl=60)
        async def handle(event: Event) -> None:
            seen.append((event.id, event.source))

        real = alice.event("user.login.done", {"real": True})
        forged = bob.event("user.login.done", {"real": False})
        forged = dataclasses.replace(forged, id=real.id)
        async with running(victim):
            await bob.publish_many([forged])
            await alice.publish_many([real, real])  # the second: a retry, a duplicate
            await wait_until(lambda: len(seen) >= 2, what="both events handled")
            await wait_until(
                lambda: victim.stats()["counters"].get("skipped_duplicates") == 1,
                what="alice's retry skipped",
            )
        assert seen == [(real.id, "bob"), (real.id, "alice")]

    async def test_dead_letters_reach_the_dead_letter_stream_as_the_bots_group(
        self, redis: Redis, relaying: OutboxRelay, bus_factory: BusFactory
    ) -> None:
        """A bot's dead letter goes to the DLQ under its own group, whatever it claims."""
        bob = await bus_factory("bob", outbox=True)
        letter_id = await dead_letter(bob, claimed_group=group_name("alice"))
        assert letter_id  # the outbox entry's id
        await wait_until(lambda: empty(redis, "bob"), what="the letter relayed")
        (letter,) = await DeadLetters(redis, KEYS, ROUTER).list()
        assert (letter.group, letter.error, letter.event_id) == (group_name("bob"), "boom", "e1")
        rows: Any = await redis.xrange(KEYS.dead_letters())
        assert DEAD_LETTER_MARK not in rows[0][1]

    async def test_a_letter_is_retried_with_the_source_its_stream_held(
        self, redis: Redis, relaying: OutboxRelay, bus_factory: BusFactory
    ) -> None:
        """A bot's letter whose copy of the event claims another source is retried with the
        source the stream held; a letter naming no entry the stream holds (a forged id, a
        key outside the streams, an id Redis would refuse) is refused and kept."""
        alice = await bus_factory("alice", outbox=True)
        event_id = await alice.publish("user.login.done", {})
        await wait_until(lambda: empty(redis, "alice"), what="the event relayed")
        stream = KEYS.stream("user")
        held: Any = await redis.xrange(stream)
        ((entry_id, fields),) = held
        bob = await bus_factory("bob", outbox=True)
        forged = {**fields, "source": "manager"}
        for named, claimed in [
            (stream, entry_id),
            (stream, "1-1"),
            (KEYS.pressure(), "1-1"),
            (stream, "99999999999999999999-0"),
            (stream, "x"),
        ]:
            await bob.dlq.add(
                fields=forged,
                reason=DeadLetterReason.HANDLER_ERROR,
                error="boom",
                stream=named,
                entry_id=claimed,
                group="",
                consumer="bob-0",
            )
        await wait_until(lambda: empty(redis, "bob"), what="the letters relayed")
        letters = DeadLetters(redis, KEYS, ROUTER)
        good, *bad = await letters.list()
        assert (good.origin, good.source, good.fields["source"]) == ("found", "alice", "manager")
        assert [(b.origin, b.source) for b in bad] == [("missing", None)] * 4
        retried = await letters.retry(good.id)
        rows: Any = await redis.xrange(stream, retried, retried)
        assert (rows[0][1]["id"], rows[0][1]["source"]) == (event_id, "alice")
        with pytest.raises(DeadLetterRetryError, match="who published it is unknown"):
            await letters.retry(bad[0].id)
        assert await letters.count() == 4

    async def test_entries_written_while_no_relay_runs_are_moved_once(
        self, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """Publishes succeed while the manager is down; its next relay moves each once."""
        alice = await bus_factory("alice", outbox=True)
        ids = await alice.publish_many([("user.login.done", {"n": n}) for n in range(1200)])
        relay = relay_for(redis, "alice", batch=500)
        assert await relay.drain("alice") == 1200
        assert await relay.drain("alice") == 0
        assert [e["id"] for e in await entries(redis, "user")] == ids

    async def test_a_removed_bots_outbox_is_relayed_at_start(
        self, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """Events a bot published before it left the config (the manager down meanwhile)
        still reach their stream, as that bot's, when the relay starts."""
        carol = await bus_factory("carol", outbox=True)
        event_id = await carol.publish("user.login.done", {})
        relay = relay_for(redis, "alice")
        task = asyncio.create_task(relay.run())
        try:
            await wait_until(lambda: empty(redis, "carol"), what="carol's outbox relayed")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert [(e["id"], e["source"]) for e in await entries(redis, "user")] == [
            (event_id, "carol")
        ]
        await wait_until(
            lambda: _gone(redis, KEYS.outbox("carol")), what="carol's emptied outbox deleted"
        )
        assert await redis.exists(KEYS.outbox("alice")) == 0 or await empty(redis, "alice")

    async def test_a_bot_removed_while_relaying_gets_its_outbox_drained(
        self, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """A bot a reload removes: what it publishes while it stops is relayed without a
        restart, and its outbox key goes after the grace; a configured bot's outbox stays."""
        configured = {"alice", "dave"}
        relay = OutboxRelay(
            redis, KEYS, ROUTER, lambda: sorted(configured), block=0.1, departed_grace=0.5
        )
        task = asyncio.create_task(relay.run())
        dave, alice = (
            await bus_factory("dave", outbox=True),
            await bus_factory("alice", outbox=True),
        )
        try:
            await alice.publish("user.login.done", {})
            await wait_until(lambda: empty(redis, "alice"), what="alice's outbox relayed")
            configured.discard("dave")  # the reload: dave's process stopped, after a last word
            last = await dave.publish("user.login.done", {"last": True})
            await wait_until(lambda: _gone(redis, KEYS.outbox("dave")), what="dave's outbox")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert last in [e["id"] for e in await entries(redis, "user")]
        assert await redis.exists(KEYS.outbox("alice")) == 1  # configured: kept, if empty

    async def test_any_bytes_are_relayed_and_a_huge_entry_is_dead_lettered(
        self, raw: Redis, redis: Redis, relaying: OutboxRelay
    ) -> None:
        """Entries a bot wrote by hand (no type, bytes that are not UTF-8, a field named
        like the stamp) are relayed for consumers to judge; one with too many fields to
        relay is dead-lettered without its content, and the entries after it still move."""
        outbox = KEYS.outbox("alice")
        await raw.xadd(outbox, {b"\xff": b"\xfe", b"source": b"x"})
        fields: dict[bytes, bytes] = {str(n).encode(): b"v" for n in range(MAX_FIELDS + 1)}
        await raw.xadd(outbox, fields)  # type: ignore[arg-type]
        await raw.xadd(outbox, {b"type": b"user.a.b"})
        await wait_until(lambda: empty(redis, "alice"), what="all three relayed")
        bot_rows: Any = await raw.xrange(KEYS.stream("bot"))
        assert [f for _, f in bot_rows] == [{b"\xff": b"\xfe", b"source": b"alice"}]
        assert [e["source"] for e in await entries(redis, "user")] == ["alice"]
        (letter,) = await DeadLetters(redis, KEYS, ROUTER).list()
        assert (letter.reason, letter.group) == ("malformed", group_name("alice"))
        assert f"{MAX_FIELDS + 1} fields" in letter.error

    async def test_an_outbox_that_is_no_stream_stops_only_its_bot(
        self, redis: Redis, relaying: OutboxRelay, bus_factory: BusFactory
    ) -> None:
        """A bot that made its outbox a string is reported; the others' events still flow,
        and its own flow again once the key is deleted."""
        await redis.set(KEYS.outbox("alice"), "not a stream")
        bob = await bus_factory("bob", outbox=True)
        with capture_logs() as logs:
            await bob.publish("user.login.done", {})
            await wait_until(lambda: empty(redis, "bob"), what="bob's event relayed")
            await wait_until(lambda: _logged(logs, "alice"), what="alice's outbox reported")
        await redis.delete(KEYS.outbox("alice"))
        alice = await bus_factory("alice", outbox=True)
        await alice.publish("user.login.done", {})
        await wait_until(lambda: _count(redis, "user", 2), what="alice's event relayed")

    async def test_a_target_that_is_no_stream_holds_its_entries_and_repeats_none(
        self, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """An admin overwrote the dead-letter stream with a string: the bot's events reach
        their stream at most once however many rounds pass, the letter waits in the outbox
        (which is not taken for broken), and everything moves once the key is deleted. On
        one node the batch stops at the letter, so the event after it waits too; a cluster
        appends per target, each in order and once (its cursors)."""
        await redis.set(KEYS.dead_letters(), "not a stream")
        alice = await bus_factory("alice", outbox=True)
        first = await alice.publish("user.login.done", {"n": 1})
        await dead_letter(alice)
        second = await alice.publish("user.login.done", {"n": 2})
        relay = relay_for(redis, "alice")
        with capture_logs() as logs:
            task = asyncio.create_task(relay.run())
            try:
                await wait_until(lambda: _logged(logs, "alice"), what="the key reported")
                for _ in range(3):  # rounds pass: nothing moves twice
                    assert int(await relay.drain("alice")) == 0
                moved = [e["id"] for e in await entries(redis, "user")]
                if is_cluster(redis):
                    assert moved == [first, second]
                else:  # nothing jumps the letter's place in the queue
                    assert moved == [first]
                    assert int(await redis.xlen(KEYS.outbox("alice"))) == 2
                errors = [e for e in logs if e["log_level"] == "error"]
                assert f"redis-cli DEL {KEYS.dead_letters()}" in errors[0]["event"]
                assert not any("outbox is not a stream" in e["event"] for e in errors)
                await redis.delete(KEYS.dead_letters())
                await wait_until(lambda: empty(redis, "alice"), what="the rest moved")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert [e["id"] for e in await entries(redis, "user")] == [first, second]
        assert len(await DeadLetters(redis, KEYS, ROUTER).list()) == 1

    async def test_redis_restart_loses_nothing(
        self, redis_server: RedisServer, redis: Redis, bus_factory: BusFactory
    ) -> None:
        """The relay backs off while Redis is down and moves the outbox after its restart."""
        relay = relay_for(redis, "alice")
        task = asyncio.create_task(relay.run())
        try:
            alice: BusClient = await bus_factory("alice", outbox=True)
            await alice.publish("user.login.done", {})
            await wait_until(lambda: _count(redis, "user", 1), what="the first event relayed")
            await redis_server.kill()
            await asyncio.sleep(0.3)  # the relay meets a dead Redis
            await redis_server.restart()
            await alice.publish("user.login.done", {})
            await wait_until(lambda: _count(redis, "user", 2), timeout=15, what="relayed again")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _logged(logs: list[MutableMapping[str, Any]], bot: str) -> bool:
    return any(e.get("bot_id") == bot and e["log_level"] == "error" for e in logs)


async def _count(redis: Redis, stream: str, count: int) -> bool:
    return int(await redis.xlen(KEYS.stream(stream))) == count


async def _gone(redis: Redis, key: str) -> bool:
    return int(await redis.exists(key)) == 0
