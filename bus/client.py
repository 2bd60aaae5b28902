"""BusClient: the one object a bot holds to publish, subscribe and replay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, Unpack, overload

import structlog
from redis.asyncio import Redis

from bus.cluster_relay import Durable
from bus.connection import Connections
from bus.consumer import Consumer
from bus.dlq import DeadLetters
from bus.errors import BusError, SubscriptionError
from bus.event import Event
from bus.hooks import Fence, HandlerObserver
from bus.keys import Keys, consumer_name, group_name
from bus.metrics import BusMetrics
from bus.plain_settings import AnyBusSettings, PlainBusSettings
from bus.routing import Router
from bus.schemas import SchemaRegistry
from bus.subscription import (
    Allowed,
    AnyHandler,
    SubscribeOptions,
    Subscription,
    SubscriptionRegistry,
)

if TYPE_CHECKING:
    from bus.archive.store import ArchiveStore
    from bus.publisher import Draft, Publisher

log = structlog.get_logger("bus.client")
H = TypeVar("H", bound=AnyHandler)


class BusClient:
    """Publish, subscribe and replay on the bus for one bot process.

    ``bot_id`` names the bot (its consumer group is ``bot-group-<bot_id>``); ``instance``
    names this process among the bot's replicas and must be stable across restarts so a
    restarted process finds the entries it had taken. ``observer`` is told when handlers
    start and end (the bot runtime uses it to report the entries in flight). ``allowed``
    limits what reaches any handler to what the bot's config declares. ``metrics`` counts
    what it published and handled (the bot runtime reports it to the manager).
    ``backpressure=False`` publishes past the manager's backpressure flag (for the
    manager's own events; see :mod:`bus.backpressure`).

    Use as an async context manager, or call :meth:`connect` and :meth:`close`::

        async with BusClient("greeter", settings=BusSettings(redis_url=url)) as bus:
            @bus.subscribe("user.message.*", where={"lang": "en"})
            async def greet(event: Event) -> None:
                await bus.publish("user.message.sent", {"user_id": event.data["user_id"], ...})
            await bus.run()
    """

    def __init__(
        self,
        bot_id: str,
        *,
        settings: AnyBusSettings | None = None,
        instance: int | str = 0,
        source: str | None = None,
        schemas: SchemaRegistry | None = None,
        redis: Redis | None = None,
        observer: HandlerObserver | None = None,
        allowed: Allowed | None = None,
        backpressure: bool = True,
    ) -> None:
        self.bot_id = bot_id
        self._backpressure = backpressure
        self.observer = observer
        self._fence: Fence | None = None
        self._allowed = allowed
        self.instance = instance
        self.settings: AnyBusSettings = settings or PlainBusSettings()
        self.schemas = schemas or SchemaRegistry(strict=self.settings.strict_schemas)
        self.keys = Keys(self.settings.namespace)
        self.router = Router.of(self.settings)
        self._source = source or bot_id
        self._given_redis = redis
        self._links: Connections | None = None
        self._publisher: Publisher | None = None
        self._subscriptions = SubscriptionRegistry(self.settings.consumer, self.router, self.keys)
        self._consumer: Consumer | None = None
        self._stopped = asyncio.Event()
        self._ready = asyncio.Event()
        self._archive: ArchiveStore | None = None
        #: Counters and histograms of this client's traffic since it was made.
        self.metrics = BusMetrics()

    @classmethod
    def from_url(cls, url: str, bot_id: str, **kwargs: Any) -> BusClient:
        """A client for ``url`` with default settings otherwise."""
        from bus.settings import BusSettings  # noqa: PLC0415 - pydantic, for scripts only

        return cls(bot_id, settings=BusSettings(redis_url=url), **kwargs)

    # -- connection ----------------------------------------------------------------------

    async def connect(self) -> BusClient:
        """Open the Redis connection pool (lazy: no round trip until the first command)."""
        if self._links is None:
            name = consumer_name(self.bot_id, self.instance)
            self._links = Connections(self.settings, name, given=self._given_redis)
        return self

    async def close(self) -> None:
        """Stop consuming (if running) and close the connections."""
        if self._consumer is not None:
            await self.stop()
        if self._archive is not None:
            await self._archive.close()
            self._archive = None
        if self._publisher is not None:
            await self._publisher.close()
        if self._links is not None:
            await self._links.aclose()
        self._links = self._publisher = None

    async def __aenter__(self) -> BusClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def redis(self) -> Redis:
        """The underlying redis-py client (for the coordinator and tools); in a bot run by
        the manager, the one of its own keys (state, leases, run-once markers, outbox)."""
        return self._connected().redis

    @property
    def streams(self) -> Redis:
        """The client of the group's commands (read, ack, claim) and the backpressure flag:
        :attr:`redis` itself unless ``settings.streams_url`` names another Redis user (as
        the manager does for its bots, whose group lives in their inboxes)."""
        return self._connected().streams

    @property
    def replays(self) -> Redis:
        """The client replays read the streams with (``XRANGE``), and that publishes to them
        without an outbox: :attr:`streams` unless ``settings.replay_url`` names another
        Redis user (as the manager does for its bots)."""
        return self._connected().replays

    def _connected(self) -> Connections:
        if self._links is None:
            raise BusError("the bus client is not connected: use `async with BusClient(...)`")
        return self._links

    @property
    def group(self) -> str:
        """This bot's consumer group."""
        return group_name(self.bot_id)

    @property
    def dlq(self) -> DeadLetters:
        """The namespace's dead-letter stream."""
        writer = self.redis if self._outbox else self.replays
        durable = Durable.of(self.settings)
        return DeadLetters(writer, self.keys, self.router, outbox=self._outbox, durable=durable)

    @property
    def _outbox(self) -> str | None:
        """The bot's outbox when it publishes through one (a bot run by the manager)."""
        return self.keys.outbox(self.bot_id) if self.settings.outbox else None

    # -- publishing ----------------------------------------------------------------------

    def _pub(self) -> Publisher:
        """The publisher, made with the first publish (a bot that only consumes loads none)."""
        if self._publisher is None:
            from bus.publisher import Publisher  # noqa: PLC0415 - see above

            links = self._connected()
            self._publisher = Publisher(
                links.redis if self._outbox else links.replays,  # replays: direct publishing
                self.settings,
                self.schemas,
                self._source,
                self.metrics,
                backpressure=self._backpressure,
                outbox=self._outbox,
                pressure=links.streams,
                lookup=links.replays,  # reads the streams (a lost reply's events)
            )
        return self._publisher

    def event(self, type: str, data: Mapping[str, Any] | None = None, **kw: Any) -> Event:
        """Build (but do not publish) an event from this client, for :meth:`publish_many`."""
        return self._pub().event(type, data, **kw)

    async def publish(
        self,
        type: str,
        data: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        version: int = 1,
    ) -> str:
        """Publish one event; return its id once Redis confirmed it.

        ``key`` is the ordering key: events with the same key reach each handler in publish
        order. Inside a handler, correlation and causation are set from the handled event.
        Raises :class:`~bus.errors.EventValidationError` for bad input (nothing is sent) and
        :class:`~bus.errors.BusConnectionError` when Redis does not answer after retries.
        """
        pub = self._pub()
        event = pub.event(
            type,
            data,
            key=key,
            correlation_id=correlation_id,
            causation_id=causation_id,
            version=version,
        )
        await pub.publish(event)
        return event.id

    def check(self, event: Event) -> None:
        """Raise :class:`EventValidationError` if publishing ``event`` would fail validation
        (type, data, key, the registered schema, the size limit); send nothing."""
        self._pub().prepare(event)

    async def publish_many(self, drafts: Iterable[Draft]) -> list[str]:
        """Publish many events in one pipeline; return their ids in order."""
        return [e.id for e in await self._pub().publish_many(drafts)]

    # -- subscribing ---------------------------------------------------------------------

    @overload
    def subscribe(self, pattern: str, handler: H, **options: Unpack[SubscribeOptions]) -> H: ...

    @overload
    def subscribe(
        self, pattern: str, handler: None = None, **options: Unpack[SubscribeOptions]
    ) -> Callable[[H], H]: ...

    def subscribe(
        self, pattern: str, handler: H | None = None, **options: Unpack[SubscribeOptions]
    ) -> Any:
        """Subscribe ``handler`` to events whose type matches ``pattern``; or use as decorator.

        Options (all keyword): ``where`` filters on data (a mapping, see
        :mod:`bus.conditions`, or a callable). ``name`` tells subscriptions apart (dead
        letters are retried to one by it). ``model`` (a pydantic model) parses data and
        passes it as the handler's second argument. ``batch=N`` hands the handler lists of
        up to N events, waiting at most ``batch_wait`` seconds (0.05) to fill one.
        ``idempotent_ttl`` runs the handler once per event (id and source) for that many
        seconds. ``retry`` and ``breaker`` override the consumer defaults. ``timeout``
        (seconds, or None for no limit; default ``consumer.handler_timeout``) cancels a
        handler call that runs longer: a failed attempt, retried, then dead-lettered with
        reason ``timeout``, while events of other keys go on.
        """

        def register(fn: H) -> H:
            if self._consumer is not None:
                raise SubscriptionError("subscribe before run(): the consumer is already running")
            self._subscriptions.add(pattern, fn, **options)
            return fn

        if handler is not None:
            register(handler)
            return handler
        return register

    @property
    def subscriptions(self) -> list[Subscription]:
        """The subscriptions declared so far."""
        return list(self._subscriptions)

    async def run(self) -> None:
        """Consume until :meth:`stop`. A client with no subscriptions just waits for stop."""
        await self.connect()
        if self._consumer is not None:
            raise BusError("run() is already running")
        self._stopped.clear()
        if not self._subscriptions:
            self._ready.set()
            await self._stopped.wait()
            return
        self._consumer = Consumer(
            redis=self.streams,
            state=self.redis,
            keys=self.keys,
            settings=self.settings.consumer,
            bot_id=self.bot_id,
            instance=self.instance,
            subscriptions=list(self._subscriptions),
            schemas=self.schemas,
            dlq=self.dlq,
            ready=self._ready,
            observer=self.observer,
            fence=self._fence,
            allowed=self._allowed,
            metrics=self.metrics,
            max_data_bytes=self.settings.max_event_bytes,
            inboxes=self.settings.inboxes,
            partitions=self.router.partitions,
            records=self._outbox if self.settings.delivery_records else None,
        )
        try:
            await self._consumer.run()
        finally:
            self._consumer = None
            self._ready.clear()
            self._stopped.set()

    def set_fence(self, valid: Callable[[], bool], lost: Callable[[], None]) -> None:
        """Ask ``valid()`` before every handler call (an active replica: whether its lease
        still holds); when False no handler runs, ``lost()`` is called and the entry stays
        pending. Set it before :meth:`run`."""
        if self._consumer is not None:
            raise BusError("set_fence before run(): the consumer is already running")
        self._fence = Fence(valid, lost)

    async def wait_ready(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a deadline
        """Wait until :meth:`run` created the groups and reads (events published after this
        are delivered even when the groups start at new events only)."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - grace period
        """Stop taking events, let in-flight handlers finish within ``timeout``, then return."""
        consumer = self._consumer
        if consumer is None:
            self._stopped.set()
            return
        consumer.stop(timeout)
        await self._stopped.wait()

    def reclaim_now(self) -> None:
        """Take over entries left idle by dead consumers now, not at the next reclaim tick."""
        if self._consumer is not None:
            self._consumer.reclaim_now()

    def stats(self) -> dict[str, Any]:
        """Counters of the running consumer and the state of each subscription."""
        counters = dict(self._consumer.stats) if self._consumer else {}
        return {"counters": counters, "subscriptions": [s.describe() for s in self._subscriptions]}

    # -- replay --------------------------------------------------------------------------

    async def archive(self) -> ArchiveStore | None:
        """The archive in PostgreSQL (``settings.archive_dsn``, read-only for bots), or None."""
        if self._archive is None and self.settings.archive_dsn:
            from bus.archive.store import ArchiveStore  # noqa: PLC0415 - only bots that replay

            self._archive = await ArchiveStore.connect(self.settings.archive_dsn, keys=self.keys)
        return self._archive

    async def replay(
        self,
        patterns: str | Iterable[str],
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        *,
        archive: ArchiveStore | None = None,
    ) -> AsyncIterator[Event]:
        """Events matching ``patterns`` since a stream id or time, in order: those still in
        Redis, and those already trimmed to PostgreSQL from ``archive`` (by default the
        client's own, when its settings name one)."""
        from bus.replay import replay  # noqa: PLC0415 - loaded by the bots that replay

        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        store = archive or await self.archive()
        async for event in replay(
            self.replays, self.keys, self.router, pats, since, until, store=store
        ):
            yield event

    async def catch_up(
        self,
        patterns: str | Iterable[str],
        handler: Callable[[Event], Awaitable[object]],
        since: datetime | str,
    ) -> int:
        """Hand ``handler`` every event since ``since`` up to this bot's group's position
        (from Redis and the archive), so :meth:`run` then goes on live without a gap: "give
        me everything since my last seen event, then live". How many events it handled.

        Call before :meth:`run`. The group is created at the streams' ends if it is new.
        Entries pending in the group may come again through :meth:`run` (at least once).
        """
        from bus.catch_up import catch_up  # noqa: PLC0415 - loaded by the bots that catch up

        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        return await catch_up(self, pats, handler, since)

    def __repr__(self) -> str:
        state = "running" if self._consumer else ("connected" if self._links else "idle")
        return f"<BusClient bot={self.bot_id} instance={self.instance} {state}>"
