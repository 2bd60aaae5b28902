"""Publishing: validate, route, encode and XADD (one, or many in one pipeline), once each
(:mod:`bus.appends`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.appends import Appender
from bus.backpressure import Backpressure, refused
from bus.connection import is_cluster, raise_swallowed_cancel, redact
from bus.context import correlation_for
from bus.errors import BusConnectionError, BusDurabilityError, EventValidationError
from bus.event import Event, validate_data, validate_key, validate_source, validate_type
from bus.held_connection import HeldConnection
from bus.keys import Keys
from bus.metrics import BusMetrics
from bus.plain_settings import AnyBusSettings
from bus.redis_errors import UNAVAILABLE, is_oom
from bus.routing import Router
from bus.schemas import SchemaRegistry
from bus.wire import encode, encode_data

log = structlog.get_logger("bus.publisher")

#: What ``publish_many`` accepts: ready events or ``(type, data)`` pairs.
Draft = Event | tuple[str, Mapping[str, Any]]


class Publisher:
    """Turns drafts into stream entries. One per bus client; ``metrics`` counts what Redis
    confirmed. With ``backpressure`` (the default) a publish first waits while the manager
    says Redis is nearly full (see :mod:`bus.backpressure`); the manager's own events skip
    that wait. With ``outbox`` every entry goes to that key instead of its stream.
    ``pressure``: the client that reads the flag, when not ``redis`` (a bot's stream user);
    ``lookup``: the one that reads the streams, when not ``redis`` (a bot's replay user)."""

    def __init__(
        self,
        redis: Redis,
        settings: AnyBusSettings,
        schemas: SchemaRegistry,
        source: str,
        metrics: BusMetrics | None = None,
        *,
        backpressure: bool = True,
        outbox: str | None = None,
        pressure: Redis | None = None,
        lookup: Redis | None = None,
    ) -> None:
        self._redis = redis
        #: The connection single publishes go on (see :mod:`bus.held_connection`).
        self._held = HeldConnection(redis)
        self._metrics = metrics or BusMetrics()
        self._settings = settings
        self._keys = Keys(settings.namespace)
        self._router = Router.of(settings)
        self._schemas = schemas
        self.source = validate_source(source)
        #: Where this publisher writes instead of the streams: the bot's outbox, which the
        #: manager relays (see :mod:`bus.outbox`).
        self._outbox = outbox
        self._pressure = (
            Backpressure(pressure or redis, self._keys, settings.backpressure_wait)
            if backpressure
            else None
        )
        #: Appends each event once, also across lost replies (see :mod:`bus.appends`).
        self._appender = Appender(
            self._held,
            redis,
            settings,
            lookup=lookup,
            routed=(lambda e: self.stream_key(e.type, e.key)) if outbox else None,
        )
        #: Replicas that must confirm each publish (WAIT), and how long to wait for them.
        self._replicas = settings.publish_replicas
        self._replicas_timeout_ms = round(settings.publish_replicas_timeout * 1000)

    def event(
        self,
        type: str,
        data: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        source: str | None = None,
        version: int = 1,
    ) -> Event:
        """Build a validated event, joining the correlation chain of the handled event."""
        correlation_id, causation_id = correlation_for(correlation_id, causation_id)
        return Event(
            type=validate_type(str(type)),
            data=validate_data({} if data is None else data),
            source=validate_source(source) if source is not None else self.source,
            correlation_id=correlation_id,
            causation_id=causation_id,
            timestamp=datetime.now(UTC),
            version=version,
            key=validate_key(key),
        )

    def prepare(self, draft: Draft) -> tuple[str, dict[str, str | bytes], Event]:
        """Validate a draft; its stream key, wire fields and event."""
        event = draft if isinstance(draft, Event) else self.event(draft[0], draft[1])
        if isinstance(draft, Event):
            validate_type(event.type)
            validate_data(event.data)
            validate_key(event.key)
        self._schemas.check(event.type, event.data)
        data_json = encode_data(event.data)
        if len(data_json) > self._settings.max_event_bytes:
            raise EventValidationError(
                "data",
                f"{len(data_json)} bytes encoded exceeds the limit of "
                f"{self._settings.max_event_bytes} bytes (max_event_bytes): store large "
                "payloads elsewhere and publish a reference",
            )
        stream = self._outbox or self._keys.stream(self._router.target(event.type, event.key))
        return stream, encode(event, data_json), event

    def stream_key(self, type_: str, key: str | None = None) -> str:
        """The stream key an event type (with ``key``: on a partitioned route) goes to."""
        return self._keys.stream(self._router.target(type_, key))

    async def publish(self, event: Event) -> str:
        """XADD one event; return the entry id once Redis confirmed it (of the outbox entry,
        when publishing through the outbox: or of the stream's, when a try whose reply was
        lost had written it and the relay had moved it on; see :mod:`bus.appends`)."""
        stream, fields, _ = self.prepare(event)
        try:
            if self._pressure is not None:
                await self._pressure.admit()
            if self._replicas:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.xadd(stream, fields)  # type: ignore[arg-type]
                    entry_id, acknowledged = await self._wait(pipe, [stream])
            else:
                (entry_id,) = await self._appender.append([(stream, fields, event)])
        except UNAVAILABLE as exc:
            raise self._unavailable(exc, 1) from exc
        except ResponseError as exc:
            if is_oom(exc):
                raise refused(exc, 1) from exc
            raise
        raise_swallowed_cancel()
        self._metrics.published(event.type)
        if self._replicas:
            self._check_replicas(acknowledged, 1)
        return str(entry_id)

    async def _wait(self, pipe: Any, streams: list[str]) -> tuple[Any, int]:
        """Add ``WAIT`` to ``pipe`` (on the connection that wrote), run it: the first reply
        and how many replicas confirmed everything written before. On a cluster the
        pipeline writes to each stream's primary on one connection: a ``WAIT`` for each of
        those primaries, and the fewest replicas any confirmed."""
        nodes: list[Any] = [None]
        if is_cluster(self._redis):
            cluster: Any = self._redis
            await cluster.initialize()  # at once when it knows the slots already
            nodes = list({n.name: n for n in map(cluster.get_node_from_key, streams)}.values())
        for node in nodes:
            target = {} if node is None else {"target_nodes": node}
            pipe.execute_command("WAIT", self._replicas, self._replicas_timeout_ms, **target)
        replies: list[Any] = await pipe.execute()
        return replies[0], min(int(n) for n in replies[len(replies) - len(nodes) :])

    def _check_replicas(self, acknowledged: int, count: int) -> None:
        if acknowledged >= self._replicas:
            return
        raise BusDurabilityError(
            f"{count} event(s) written to the primary, but only {acknowledged} of "
            f"{self._replicas} replicas confirmed them within "
            f"{self._settings.publish_replicas_timeout:g}s (publish_replicas): a failover now "
            "could lose them. Check the replicas (INFO replication: are they connected and "
            "in sync?); publishing again is safe for consumers that deduplicate by event id",
            acknowledged,
        )

    async def publish_many(self, drafts: Iterable[Draft]) -> list[Event]:
        """Validate every draft first, then XADD all in one pipeline; return the events.

        Nothing is sent when one draft is invalid. If Redis fails mid-way, some entries may
        be written: the error says so, and republishing the same events is safe for
        consumers that deduplicate by event id.
        """
        prepared = [self.prepare(d) for d in drafts]
        if not prepared:
            return []
        try:
            if self._pressure is not None:
                await self._pressure.admit(len(prepared))
            acknowledged = 0
            if not self._replicas:
                await self._appender.append(prepared)
            else:  # the WAIT must follow the XADDs on their connection: a pipeline
                async with self._redis.pipeline(transaction=False) as pipe:
                    for stream, fields, _ in prepared:
                        pipe.xadd(stream, fields)  # type: ignore[arg-type]
                    streams = [stream for stream, _, _ in prepared]
                    _, acknowledged = await self._wait(pipe, streams)
        except UNAVAILABLE as exc:
            raise self._unavailable(exc, len(prepared)) from exc
        except ResponseError as exc:
            if is_oom(exc):
                raise refused(exc, len(prepared)) from exc
            raise
        raise_swallowed_cancel()
        published = self._metrics.published
        for _, _, event in prepared:
            published(event.type)
        if self._replicas:
            self._check_replicas(acknowledged, len(prepared))
        return [event for _, _, event in prepared]

    async def close(self) -> None:
        """Give back the connection publishes were sent on (before the pool closes)."""
        await self._held.release()

    def _unavailable(self, exc: BaseException, count: int) -> BusConnectionError:
        from bus.tls import REDIS_TLS, tls_problem  # noqa: PLC0415 - only once Redis is away

        if problem := tls_problem(exc, self._settings.redis_url, REDIS_TLS):
            return BusConnectionError(f"could not publish {count} event(s): {problem}")
        return BusConnectionError(
            f"could not publish {count} event(s): Redis at {redact(self._settings.redis_url)} "
            f"did not answer after {self._settings.connect_retries} retries ({exc}). "
            "Check that Redis is running and reachable; unconfirmed events may need republishing."
        )
