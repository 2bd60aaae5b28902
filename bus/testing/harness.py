"""TestBus: one bot on a private Redis; publish to it, wait for what it publishes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from bus.client import BusClient
from bus.dlq import DeadLetter
from bus.errors import BusError
from bus.event import Event
from bus.publisher import Draft
from bus.settings import BusSettings, ConsumerSettings, RetrySettings
from bus.testing.server import private_redis
from bus.testing.streams import (
    Condition,
    Match,
    describe,
    describe_letter,
    group_backlog,
    read_events,
)

#: What :meth:`TestBus.start` runs: a bot's ``async def main(bus)``.
BotMain = Callable[[BusClient], Awaitable[object]]

#: The bot's consumer in a test: groups start at the beginning of the streams (an event
#: published before they exist still reaches the bot) and retries are quick (a failing
#: handler is dead-lettered within some 0.1 s, after the usual three attempts).
TEST_CONSUMER = ConsumerSettings(
    block_ms=500, start_id="0", retry=RetrySettings(backoff_base=0.01, backoff_cap=0.05)
)
_BLOCK_CAP = 1.0  # seconds one XREAD of wait_for blocks (a crash of the bot ends it sooner)
_SHOWN = 20  # events and dead letters listed in a timeout's message


class BotCrashedError(BusError, AssertionError):
    """The bot's main raised; its exception is the ``__cause__``."""


class WaitTimeoutError(BusError, AssertionError, TimeoutError):
    """What a test waited for did not happen in time; the message says what was seen."""


class TestBus:
    """Runs one bot against the real bus on a private Redis, for the bot's tests.

    ``bot_id`` names the bot (its group is ``bot-group-<bot_id>``). Without ``redis_url``
    each TestBus starts its own redis-server (see :func:`private_redis`); with one, it uses
    a fresh namespace there and deletes its keys at the end. ``settings`` replace the test
    defaults (:data:`TEST_CONSUMER`); their URL is replaced. ``source`` is what the test's
    own events say they come from. ``timeout`` is the default of every wait, in seconds.
    """

    __test__ = False  # pytest: a helper, not a test class

    def __init__(
        self,
        bot_id: str,
        *,
        redis_url: str | None = None,
        settings: BusSettings | None = None,
        instance: int | str = 0,
        source: str = "test",
        timeout: float = 5.0,
    ) -> None:
        self.bot_id = bot_id
        self.timeout = timeout
        self._url = redis_url
        self._given = settings
        self._instance = instance
        self._source = source
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: BusClient | None = None
        self._driver: BusClient | None = None
        self._task: asyncio.Task[object] | None = None
        #: Set while the bot's main has raised and no wait has reported it yet.
        self._crashed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> TestBus:
        async with contextlib.AsyncExitStack() as stack:
            url: str = (
                self._url
                if self._url is not None
                else await stack.enter_async_context(private_redis())
            )
            settings = self._settings(url)
            client = BusClient(self.bot_id, settings=settings, instance=self._instance)
            driver = BusClient(self._source, settings=settings, schemas=client.schemas)
            stack.push_async_callback(driver.close)
            stack.push_async_callback(client.close)
            await client.connect()
            await driver.connect()
            if self._url is not None and self._given is None:
                stack.push_async_callback(self._delete_namespace, driver)
            self._client, self._driver = client, driver
            self._stack = stack.pop_all()
        return self

    def _settings(self, url: str) -> BusSettings:
        if self._given is not None:
            return self._given.model_copy(update={"redis_url": url})
        namespace = "multibot" if self._url is None else f"test-{secrets.token_hex(4)}"
        return BusSettings(redis_url=url, namespace=namespace, consumer=TEST_CONSUMER)

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            await self._stop_bot()
        finally:
            if self._stack is not None:
                await self._stack.aclose()
            self._stack = self._client = self._driver = None
        if exc_type is None:
            self._raise_if_crashed()

    async def _stop_bot(self) -> None:
        """Stop the consumer (in-flight handlers get ``timeout``), then the bot's main; cancel
        a main that does not return then."""
        task = self._task
        if task is None or task.done():
            return
        await self.client.stop(timeout=self.timeout)
        await asyncio.wait({task}, timeout=self.timeout)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def _delete_namespace(self, driver: BusClient) -> None:
        """Remove every key of the namespace this TestBus made up on a shared server."""
        keys = [k async for k in driver.redis.scan_iter(match=f"{driver.keys.namespace}:*")]
        if keys:
            await driver.redis.unlink(*keys)

    # -- the bot -------------------------------------------------------------------------

    @property
    def client(self) -> BusClient:
        """The bot's own bus client (its subscriptions, its Redis, its keys)."""
        if self._client is None:
            raise BusError("the TestBus is not open: use `async with TestBus(...) as bus`")
        return self._client

    async def start(self, main: BotMain | None = None, *, ready: bool = True) -> None:
        """Run ``main(client)`` in the background, or, without ``main``, the handlers
        subscribed on :attr:`client`; return once the bot's consumer reads.

        ``ready=False`` returns at once (for a bot that only publishes). Raises
        :class:`BotCrashedError` if the bot raises while starting.
        """
        if self._task is not None:
            raise BusError(f"the bot {self.bot_id} was started already: one bot per TestBus")
        client = self.client
        run: Awaitable[object] = main(client) if main is not None else client.run()

        async def bot() -> object:
            return await run

        self._task = asyncio.create_task(bot(), name=f"bot {self.bot_id}")
        self._task.add_done_callback(self._bot_done)
        if not ready:
            return
        waiting = asyncio.ensure_future(client.wait_ready(timeout=self.timeout))
        await asyncio.wait({waiting, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():  # the bot's main ended first
            waiting.cancel()
            await asyncio.wait({waiting})
            self._raise_if_crashed()
        elif waiting.exception() is not None:
            self._raise_if_crashed()
            raise WaitTimeoutError(
                f"the bot {self.bot_id} did not start consuming within {self.timeout:g}s: its "
                "main must call bus.run() (start(main, ready=False) for a bot that only "
                "publishes)"
            )

    def _bot_done(self, task: asyncio.Task[object]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._crashed.set()

    def _raise_if_crashed(self) -> None:
        """Raise :class:`BotCrashedError` for a bot's exception not reported yet."""
        task = self._task
        if task is None or not self._crashed.is_set():
            return
        self._crashed.clear()
        exc = task.exception()
        raise BotCrashedError(
            f"the bot {self.bot_id}'s main raised {type(exc).__name__}: {exc} (traceback above)"
        ) from exc

    def _state(self) -> str:
        """Where the bot's main is: not started, running, returned, or raised what."""
        task = self._task
        if task is None:
            return "not started"
        if not task.done():
            return "running"
        if task.cancelled() or task.exception() is None:
            return "returned"
        return f"raised {task.exception()!r}"

    # -- publishing ----------------------------------------------------------------------

    def _drv(self) -> BusClient:
        if self._driver is None:
            raise BusError("the TestBus is not open: use `async with TestBus(...) as bus`")
        return self._driver

    async def publish(
        self,
        type: str,
        data: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> str:
        """Publish an event as the test (the source given at construction); its id.

        It is checked against the schemas the bot registered on its client too.
        """
        return await self._drv().publish(
            type, data, key=key, correlation_id=correlation_id, causation_id=causation_id
        )

    def event(self, type: str, data: Mapping[str, Any] | None = None, **kw: Any) -> Event:
        """Build (not publish) an event from the test, to alter and :meth:`publish_many`."""
        return self._drv().event(type, data, **kw)

    async def publish_many(self, drafts: Iterable[Draft]) -> list[str]:
        """Publish events or ``(type, data)`` pairs in one pipeline; their ids in order."""
        return await self._drv().publish_many(drafts)

    # -- what happened -------------------------------------------------------------------

    async def published(
        self,
        pattern: str = "#",
        where: Condition = None,
        *,
        source: str | None = None,
        caused_by: str | None = None,
    ) -> list[Event]:
        """Events on the streams now (the test's and the bot's) that match, oldest first.

        ``where`` takes the conditions of ``subscribe(where=...)``; ``source`` and
        ``caused_by`` (an event id) narrow further.
        """
        match = Match.of(pattern, where, source, caused_by)
        return [e for e in await self._read(dict.fromkeys(self._streams(), "0-0")) if match(e)]

    async def dead_letters(self) -> list[DeadLetter]:
        """The namespace's dead letters, oldest first."""
        return await self.client.dlq.list(count=10_000)

    async def wait_for(
        self,
        pattern: str,
        where: Condition = None,
        *,
        source: str | None = None,
        caused_by: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - fails with what was seen
    ) -> Event:
        """The first event on the streams that matches (see :meth:`published`), waiting up
        to ``timeout`` seconds for it (default :attr:`timeout`).

        Events published before the call count. Raises :class:`WaitTimeoutError` naming
        what it waited for, the events it saw and the dead letters; or
        :class:`BotCrashedError` as soon as the bot's main raises.
        """
        match = Match.of(pattern, where, source, caused_by)
        wait = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        cursor = dict.fromkeys(self._streams(), "0-0")
        block: float | None = None  # the first read takes what is there already
        while True:
            hits = [e for e in await self._read(cursor, block) if match(e)]
            if hits:
                return hits[0]
            self._raise_if_crashed()
            left = deadline - loop.time()
            if left <= 0:
                raise WaitTimeoutError(
                    f"no event {match} within {wait:g}s; " + await self._report()
                )
            block = min(left, _BLOCK_CAP)

    async def idle(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - as wait_for
        """Wait until the bot's group has read and acked everything on every stream it
        reads: what the test published so far is handled (or dead-lettered), and so is
        what the bot published to itself meanwhile.

        Raises :class:`WaitTimeoutError` naming the groups still behind, or
        :class:`BotCrashedError` as soon as the bot's main raises.
        """
        if self._task is None:
            raise BusError("idle() waits for a running bot: call start() first")
        wait = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        pause = 0.002
        # Redis tells nobody when a group catches up: ask it, more slowly as time goes by.
        while behind := await self._behind():
            self._raise_if_crashed()
            left = deadline - loop.time()
            if left <= 0:
                raise WaitTimeoutError(
                    f"the bot {self.bot_id} was not idle within {wait:g}s: "
                    + "; ".join(behind)
                    + "; "
                    + await self._report()
                )
            with contextlib.suppress(TimeoutError):  # a crash ends the pause
                await asyncio.wait_for(self._crashed.wait(), min(pause, left))
            pause = min(pause * 2, 0.05)
        self._raise_if_crashed()

    # -- reading Redis -------------------------------------------------------------------

    def _streams(self) -> list[str]:
        """Every stream an event can be routed to."""
        client = self.client
        return [client.keys.stream(name) for name in sorted(client.router.streams())]

    async def _read(self, cursor: dict[str, str], block: float | None = None) -> list[Event]:
        """The events after ``cursor``; with ``block``, waits that a crash cuts short."""
        return await read_events(self._drv().redis, cursor, block=block, interrupt=self._crashed)

    async def _behind(self) -> list[str]:
        client = self.client
        streams = sorted({s for sub in client.subscriptions for s in sub.streams})
        return await group_backlog(self._drv().redis, client.group, streams)

    async def _report(self) -> str:
        """What was on the bus: the events, the dead letters and the bot's state."""
        events = await self._read(dict.fromkeys(self._streams(), "0-0"))
        lines = [f"the streams hold {len(events)} event(s)" + (":" if events else "")]
        if len(events) > _SHOWN:
            lines.append(f"  ... {len(events) - _SHOWN} older ones")
        lines += [f"  {describe(e)}" for e in events[-_SHOWN:]]
        letters = await self.dead_letters()
        if letters:
            lines.append(f"{len(letters)} dead letter(s):")
            lines += [f"  {describe_letter(d)}" for d in letters[-_SHOWN:]]
        lines.append(f"the bot {self.bot_id}'s main: {self._state()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "closed" if self._client is None else self._state()
        return f"<TestBus bot={self.bot_id} {state}>"
