"""bus.testing: a bot on a private Redis, with waits that are bounded and say what they saw."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

from bus import BusClient, BusError, Event, SchemaError
from bus.binaries import probe_redis_server
from bus.settings import BusSettings
from bus.testing import (
    TEST_CONSUMER,
    BotCrashedError,
    TestBus,
    WaitTimeoutError,
    private_redis,
    redis_server_binary,
)
from bus.testing.server import MIN_VERSION

pytestmark = pytest.mark.redis

PING, PONG, CRASH = "test.ping.sent", "test.pong.sent", "test.crash.requested"


async def crashes_on_request(bus: BusClient) -> None:
    """A bot that consumes until it sees CRASH, then stops its consumer and raises."""
    crash = asyncio.Event()

    @bus.subscribe(CRASH)
    async def request(event: Event) -> None:
        crash.set()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(bus.run())
        await crash.wait()
        await bus.stop()
    raise RuntimeError("lost track of the user")


async def ping_pong(bus: BusClient) -> None:
    """A bot answering each ping with a pong keyed like it."""

    @bus.subscribe(PING)
    async def pong(event: Event) -> None:
        await bus.publish(PONG, {"n": event.data["n"]}, key=event.key)

    await bus.run()


class TestPrivateRedis:
    async def test_serves_on_a_socket_removed_afterwards(self) -> None:
        """The yielded URL answers; the server's directory is gone after the block."""
        async with private_redis() as url:
            socket = Path(unquote(urlsplit(url).path))
            async with Redis.from_url(url) as redis:
                assert await redis.ping()
            assert await asyncio.to_thread(socket.exists)
        assert not await asyncio.to_thread(socket.parent.exists)

    async def test_keeps_nothing_on_disk(self) -> None:
        """No snapshots and no AOF: a test server writes nothing to keep."""
        async with private_redis() as url, Redis.from_url(url, decode_responses=True) as redis:
            assert await redis.config_get("save") == {"save": ""}
            assert await redis.config_get("appendonly") == {"appendonly": "no"}

    def test_binary_is_new_enough(self) -> None:
        """The binary chosen runs and is at least the oldest version the bus supports."""
        binary = probe_redis_server(Path(redis_server_binary()))
        assert binary is not None and binary.version >= MIN_VERSION


class TestStart:
    async def test_handlers_subscribed_on_the_client_run_without_a_main(self) -> None:
        """start() with no main runs what was subscribed on bus.client."""
        async with TestBus("echo") as bus:

            @bus.client.subscribe(PING)
            async def echo(event: Event) -> None:
                await bus.client.publish(PONG, dict(event.data))

            await bus.start()
            await bus.publish(PING, {"n": 1})
            assert (await bus.wait_for(PONG)).data == {"n": 1}

    async def test_a_bot_runs_once(self) -> None:
        """A second start() is refused."""
        async with TestBus("pinger") as bus:
            await bus.start(ping_pong)
            with pytest.raises(BusError, match="started already"):
                await bus.start(ping_pong)

    async def test_a_main_raising_while_starting_is_reported(self) -> None:
        """start() raises BotCrashedError with the bot's exception as its cause."""

        async def broken(bus: BusClient) -> None:
            raise ValueError("bad config")

        async with TestBus("broken") as bus:
            with pytest.raises(BotCrashedError, match="ValueError: bad config") as caught:
                await bus.start(broken)
            assert isinstance(caught.value.__cause__, ValueError)

    async def test_a_main_that_never_consumes_is_named(self) -> None:
        """A main that never calls bus.run() fails start() within the timeout, saying so."""

        async def forgetful(bus: BusClient) -> None:
            @bus.subscribe(PING)
            async def never_called(event: Event) -> None:
                raise AssertionError("the consumer never ran")

            await asyncio.Event().wait()

        async with TestBus("forgetful", timeout=0.2) as bus:
            with pytest.raises(WaitTimeoutError, match=r"must call bus\.run\(\)"):
                await bus.start(forgetful)

    async def test_a_bot_that_only_publishes(self) -> None:
        """ready=False starts a main that publishes and returns; what it sent is found."""

        async def announce(bus: BusClient) -> None:
            await bus.publish("test.hello.sent", {"from": bus.bot_id})

        async with TestBus("herald") as bus:
            await bus.start(announce, ready=False)
            hello = await bus.wait_for("test.hello.sent")
            assert (hello.source, hello.data) == ("herald", {"from": "herald"})


class TestWaitFor:
    async def test_finds_events_published_before_the_call(self) -> None:
        """The first match is returned, also when it was on the stream already."""
        async with TestBus("pinger") as bus:
            await bus.start(ping_pong)
            for n in range(3):
                await bus.publish(PING, {"n": n}, key="k")
            await bus.idle()
            first = await bus.wait_for(PONG)
            assert (first.data, first.source, first.key) == ({"n": 0}, "pinger", "k")

    async def test_filters_on_data_source_and_cause(self) -> None:
        """where=, source= and caused_by= narrow the match; published() takes the same."""
        async with TestBus("pinger") as bus:
            await bus.start(ping_pong)
            ids = [await bus.publish(PING, {"n": n}, key="k") for n in range(3)]
            assert (await bus.wait_for(PONG, {"n": {"gte": 2}})).causation_id == ids[2]
            assert (await bus.wait_for(PONG, caused_by=ids[1])).data == {"n": 1}
            assert (await bus.wait_for("test.#", source="test")).type == PING
            await bus.idle()
            assert [e.data["n"] for e in await bus.published(PONG)] == [0, 1, 2]
            assert await bus.published(PONG, lambda data: data["n"] > 5) == []

    async def test_timeout_names_what_it_waited_for_and_what_it_saw(self) -> None:
        """The error names the pattern and conditions, lists the events and the bot's state."""
        async with TestBus("pinger") as bus:
            await bus.start(ping_pong)
            await bus.publish(PING, {"n": 7})
            started = time.monotonic()
            with pytest.raises(WaitTimeoutError) as caught:
                await bus.wait_for(PONG, {"n": 8}, source="pinger", timeout=0.3)
            assert time.monotonic() - started < 2
            message = str(caught.value)
            assert "no event 'test.pong.sent' where {'n': 8} from pinger within 0.3s" in message
            assert "the streams hold 2 event(s)" in message
            assert "test.ping.sent from test id=" in message and '{"n":7}' in message
            assert "test.pong.sent from pinger" in message
            assert "the bot pinger's main: running" in message
            assert isinstance(caught.value, AssertionError)
            assert isinstance(caught.value, TimeoutError)

    async def test_timeout_lists_dead_letters(self) -> None:
        """A handler that keeps raising shows up in the error as a dead letter, with why."""
        async with TestBus("grumpy") as bus:

            @bus.client.subscribe(PING)
            async def refuse(event: Event) -> None:
                raise LookupError(f"no user {event.data['n']}")

            await bus.start()
            await bus.publish(PING, {"n": 3})
            await bus.idle()
            with pytest.raises(WaitTimeoutError) as caught:
                await bus.wait_for(PONG, timeout=0.1)
            assert "1 dead letter(s):" in str(caught.value)
            assert "handler_error in bot-group-grumpy/" in str(caught.value)
            assert "after 3 attempt(s): LookupError: no user 3" in str(caught.value)

    async def test_a_crash_ends_the_wait_at_once(self) -> None:
        """A main raising during a long wait fails it at once, and only once."""
        async with TestBus("fragile") as bus:
            await bus.start(crashes_on_request)
            await bus.publish(CRASH)
            started = time.monotonic()
            with pytest.raises(BotCrashedError, match="RuntimeError: lost track") as caught:
                await bus.wait_for(PONG, timeout=30)
            assert time.monotonic() - started < 5
            assert isinstance(caught.value.__cause__, RuntimeError)
            with pytest.raises(WaitTimeoutError, match=r"main: raised RuntimeError"):
                await bus.wait_for(PONG, timeout=0.1)  # reported once; later waits say so
        # leaving the block raised nothing more: the crash was reported already


class TestIdle:
    async def test_returns_once_everything_is_handled(self) -> None:
        """After idle() every event the test published was handled."""
        async with TestBus("counter") as bus:
            seen: list[int] = []

            @bus.client.subscribe(PING)
            async def count(event: Event) -> None:
                await asyncio.sleep(0)  # give the other keys a turn
                seen.append(event.data["n"])

            await bus.start()
            await bus.publish_many([(PING, {"n": n}) for n in range(50)])
            await bus.idle()
            assert sorted(seen) == list(range(50))

    async def test_includes_what_the_bot_published_to_itself(self) -> None:
        """Events the bot's handlers publish for its own handlers are handled too."""
        async with TestBus("pinger") as bus:
            pongs: list[Event] = []

            @bus.client.subscribe(PONG)
            async def record(event: Event) -> None:
                pongs.append(event)

            await bus.start(ping_pong)
            await bus.publish(PING, {"n": 1})
            await bus.idle()
            assert [p.data for p in pongs] == [{"n": 1}]

    async def test_times_out_naming_the_group_behind(self) -> None:
        """A handler that does not finish keeps the bot busy; the error says where."""
        async with TestBus("slow") as bus:
            gate = asyncio.Event()

            @bus.client.subscribe(PING)
            async def wait_for_gate(event: Event) -> None:
                await gate.wait()

            await bus.start()
            await bus.publish(PING, {"n": 1})
            with pytest.raises(WaitTimeoutError, match=r"bot-group-slow on .* has 1 pending"):
                await bus.idle(timeout=0.2)
            gate.set()
            await bus.idle()

    async def test_dead_lettered_events_count_as_handled(self) -> None:
        """A failing handler's event ends in the dead letters, with the error and attempts."""
        async with TestBus("grumpy") as bus:

            @bus.client.subscribe(PING)
            async def refuse(event: Event) -> None:
                raise LookupError("no such user")

            await bus.start()
            ping = await bus.publish(PING, {"n": 1})
            await bus.idle()
            (letter,) = await bus.dead_letters()
            assert (letter.event_id, letter.reason, letter.attempts) == (ping, "handler_error", 3)
            assert "LookupError: no such user" in letter.error

    async def test_needs_a_started_bot(self) -> None:
        """idle() before start() is a mistake, said at once."""
        async with TestBus("idle") as bus:
            with pytest.raises(BusError, match="call start"):
                await bus.idle()


class TestLifecycle:
    async def test_a_crash_nobody_waited_on_is_reported_at_the_end(self) -> None:
        """Leaving the block raises BotCrashedError for a main that raised meanwhile."""

        async def broken(bus: BusClient) -> None:
            raise ValueError("bad config")

        with pytest.raises(BotCrashedError, match="bad config"):
            async with TestBus("broken") as bus:
                await bus.start(broken, ready=False)

    async def test_the_bot_is_stopped_gracefully(self) -> None:
        """At the end the consumer stops, the main returns and the clients close."""
        returned = asyncio.Event()

        async def main(bus: BusClient) -> None:
            await ping_pong(bus)
            returned.set()

        async with TestBus("pinger") as bus:
            await bus.start(main)
            await bus.publish(PING, {"n": 1})
            await bus.wait_for(PONG)
        assert returned.is_set()
        assert repr(bus) == "<TestBus bot=pinger closed>"
        with pytest.raises(BusError, match="not open"):
            bus.client  # noqa: B018 - the property raises

    async def test_a_shared_server_gets_a_namespace_per_test_bus(self) -> None:
        """On one server, two TestBus see only their own events and leave no keys."""
        async with private_redis() as url:
            async with (
                TestBus("a", redis_url=url) as first,
                TestBus("b", redis_url=url) as second,
            ):
                assert first.client.keys.namespace != second.client.keys.namespace
                await first.start(ping_pong)
                await first.publish(PING, {"n": 1})
                await first.wait_for(PONG)
                assert await second.published() == []
            async with Redis.from_url(url) as redis:
                assert [k async for k in redis.scan_iter()] == []

    async def test_given_settings_are_kept_but_the_url(self) -> None:
        """settings= replaces the test defaults; the URL is the private server's."""
        settings = BusSettings(namespace="mine", redis_url="redis://192.0.2.1:1/0")
        async with TestBus("own", settings=settings) as bus:
            assert bus.client.settings.namespace == "mine"
            assert bus.client.settings.redis_url.startswith("unix://")
            assert bus.client.settings.consumer != TEST_CONSUMER
            await bus.start(ping_pong)
            await bus.publish(PING, {"n": 1})
            assert (await bus.wait_for(PONG)).stream == "mine:stream:{bot}"

    async def test_publishes_are_checked_against_the_bots_schemas(self) -> None:
        """The test's events must fit the schemas the bot registered."""

        class Ping(BaseModel):
            n: int

        async with TestBus("strict") as bus:
            bus.client.schemas.register(PING, Ping)
            with pytest.raises(SchemaError, match="n"):
                await bus.publish(PING, {"n": "many"})
