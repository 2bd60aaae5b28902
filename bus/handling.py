"""Running handlers: retries with backoff, circuit breaker, run-once, dead-lettering."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis

from bus.breaker import BreakerState
from bus.context import current_event
from bus.dlq import DeadLetterReason, DeadLetters
from bus.errors import SchemaError
from bus.event import Event
from bus.keys import Keys
from bus.metrics import GroupMetrics
from bus.redis_errors import UNAVAILABLE
from bus.schemas import SchemaRegistry
from bus.subscription import Subscription


class HandlerObserver(Protocol):
    """Told synchronously when a handler starts and ends on events (the bot runtime reports
    the entries in flight to the manager, so an entry that crashes the process is known)."""

    def started(self, events: Sequence[Event]) -> None:
        """A handler is about to run on ``events`` (read from a stream: entry ids are set)."""

    def finished(self, events: Sequence[Event]) -> None:
        """The handler started on ``events`` returned or raised."""


@dataclass(eq=False, slots=True)
class Delivery:
    """One stream entry being handled; acked once every matching handler is done with it."""

    stream: str
    entry_id: str
    fields: Mapping[str, str]
    event: Event | None
    remaining: int = 1
    taken_at: float = field(default_factory=time.monotonic)
    #: Whether a handler started on it (it is counted as consumed once).
    consumed: bool = False


def _summary(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc, limit=-8))


class Runner:
    """Runs subscriptions on deliveries for one consumer and reports each done delivery.

    ``meter`` counts deliveries consumed, retried and dead-lettered, and handler run times.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        dlq: DeadLetters,
        schemas: SchemaRegistry,
        group: str,
        consumer: str,
        visibility_timeout: float,
        on_done: Callable[[Delivery], None],
        stats: dict[str, int],
        log: Any,
        observer: HandlerObserver | None = None,
        meter: GroupMetrics | None = None,
    ) -> None:
        self._observer = observer
        self._meter = meter or GroupMetrics(group)
        self._redis = redis
        self._keys = keys
        self._dlq = dlq
        self._schemas = schemas
        self._group = group
        self._consumer = consumer
        self._visibility_ms = int(visibility_timeout * 1000)
        self._on_done = on_done
        self._stats = stats
        self._log = log

    async def run_one(self, sub: Subscription, delivery: Delivery) -> None:
        """Handle one delivery with one subscription, then report it done."""
        event = delivery.event
        assert event is not None
        try:
            await self._wait_breaker(sub)
            if sub.idempotent_ttl is not None and not await self._claim_once(sub, delivery):
                self._stats["skipped_duplicates"] += 1
                return
            try:
                args: tuple[Any, ...] = (event,)
                if sub.model is not None:
                    args = (event, self._schemas.parse(sub.model, event.type, event.data))
            except SchemaError as exc:
                await self.dead_letter(
                    delivery, DeadLetterReason.SCHEMA, str(exc), handler=sub.name
                )
                await self._forget_once(sub, delivery)
                return
            self._consumed(delivery)
            while (error := await self._attempts(sub, args, event, [event])) is not None:
                if not self._failed(sub):
                    await self._forget_once(sub, delivery)
                    await self.dead_letter(
                        delivery,
                        DeadLetterReason.HANDLER_ERROR,
                        f"{type(error).__name__}: {error}",
                        handler=sub.name,
                        attempts=sub.retry.max_attempts,
                        tb=_summary(error),
                    )
                    return
                self._meter.retried(event.type)  # held, not dead-lettered: try after cool-down
                await self._wait_breaker(sub)
            await self._mark_once(sub, delivery)
        finally:
            self._on_done(delivery)

    async def run_batch(self, sub: Subscription, deliveries: Sequence[Delivery]) -> None:
        """Handle a batch with a batch subscription; on final failure dead-letter each event."""
        events = [d.event for d in deliveries if d.event is not None]
        try:
            await self._wait_breaker(sub)
            for d in deliveries:
                self._consumed(d)
            while (error := await self._attempts(sub, (events,), events[0], events)) is not None:
                if self._failed(sub):
                    for e in events:
                        self._meter.retried(e.type)
                    await self._wait_breaker(sub)
                    continue
                for d in deliveries:
                    await self.dead_letter(
                        d,
                        DeadLetterReason.HANDLER_ERROR,
                        f"{type(error).__name__}: {error} (batch of {len(events)})",
                        handler=sub.name,
                        attempts=sub.retry.max_attempts,
                        tb=_summary(error),
                    )
                break
        finally:
            for d in deliveries:
                self._on_done(d)

    async def _attempts(
        self, sub: Subscription, args: tuple[Any, ...], context: Event, events: list[Event]
    ) -> BaseException | None:
        """Call the handler up to max_attempts times; None on success, else the last error."""
        error: BaseException | None = None
        for attempt in range(1, sub.retry.max_attempts + 1):
            token = current_event.set(context)
            if self._observer is not None:
                self._observer.started(events)
            started = time.perf_counter()
            try:
                await sub.handler(*args)
            except Exception as exc:
                self._meter.handled(time.perf_counter() - started)
                error = exc
                self._log.warning(
                    "handler failed",
                    handler=sub.name,
                    event_id=context.id,
                    event_type=context.type,
                    events=len(events),
                    attempt=attempt,
                    max_attempts=sub.retry.max_attempts,
                    error=f"{type(exc).__name__}: {exc}",
                )
                if attempt < sub.retry.max_attempts:
                    self._stats["retried"] += 1
                    for e in events:
                        self._meter.retried(e.type)
                    await asyncio.sleep(sub.backoff.delay(attempt))
                continue
            finally:
                current_event.reset(token)
                if self._observer is not None:
                    self._observer.finished(events)
            self._meter.handled(time.perf_counter() - started)
            self._stats["handled"] += len(events)
            if sub.breaker.record_success():
                self._log.warning("circuit closed", handler=sub.name)
            return None
        return error

    def _consumed(self, delivery: Delivery) -> None:
        """Count a delivery as consumed when its first handler starts."""
        if not delivery.consumed and delivery.event is not None:
            delivery.consumed = True
            self._meter.consumed(delivery.event.type, delivery.entry_id)

    def _failed(self, sub: Subscription) -> bool:
        """Count a final failure; True when the breaker is open, so the event is held."""
        if sub.breaker.record_failure(time.monotonic()):
            self._log.error(
                "circuit open: handler paused after consecutive failures; events wait for "
                "the cool-down instead of going to the dead-letter stream",
                handler=sub.name,
                failures=sub.breaker.failures,
                cooldown_s=sub.breaker.cooldown,
            )
        return sub.breaker.state is BreakerState.OPEN

    async def _wait_breaker(self, sub: Subscription) -> None:
        # The breaker's cool-down is a deadline, not a condition to wait on.
        while (wait := sub.breaker.wait_time(time.monotonic())) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)

    async def dead_letter(
        self,
        delivery: Delivery,
        reason: DeadLetterReason,
        error: str,
        *,
        handler: str = "",
        attempts: int = 0,
        tb: str = "",
    ) -> None:
        """Write a dead letter, retrying while Redis is away; the caller acks afterwards."""
        delay = 0.1
        while True:
            try:
                dlq_id = await self._dlq.add(
                    fields=delivery.fields,
                    reason=reason,
                    error=error,
                    stream=delivery.stream,
                    entry_id=delivery.entry_id,
                    group=self._group,
                    consumer=self._consumer,
                    handler=handler,
                    attempts=attempts,
                    traceback=tb,
                )
            except UNAVAILABLE as exc:
                self._log.warning("dead-letter write failed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            break
        self._stats["dead_lettered"] += 1
        self._meter.dead_lettered(delivery.event.type if delivery.event is not None else "")
        self._log.error(
            "event dead-lettered",
            reason=str(reason),
            dlq_id=dlq_id,
            event_id=delivery.fields.get("id"),
            event_type=delivery.fields.get("type"),
            handler=handler,
            entry_id=delivery.entry_id,
            stream=delivery.stream,
            error=error,
        )

    # Run-once markers: "running:<entry>" while handling (expires like the visibility
    # timeout), "done" once handled. A marker running for the *same* entry means an earlier
    # delivery died mid-handler, so it runs again; for another entry it is a duplicate.
    def _once_key(self, sub: Subscription, delivery: Delivery) -> str:
        assert delivery.event is not None
        return self._keys.idempotency(self._group, sub.name, delivery.event.id)

    async def _claim_once(self, sub: Subscription, delivery: Delivery) -> bool:
        key = self._once_key(sub, delivery)
        mine = f"running:{delivery.stream}:{delivery.entry_id}"
        if await self._redis.set(key, mine, nx=True, px=self._visibility_ms):
            return True
        state = await self._redis.get(key)
        if state == mine or state is None:
            await self._redis.set(key, mine, px=self._visibility_ms)
            return True
        return False

    async def _mark_once(self, sub: Subscription, delivery: Delivery) -> None:
        if sub.idempotent_ttl is not None:
            ttl_ms = int(sub.idempotent_ttl * 1000)
            await self._redis.set(self._once_key(sub, delivery), "done", px=ttl_ms)

    async def _forget_once(self, sub: Subscription, delivery: Delivery) -> None:
        if sub.idempotent_ttl is not None:
            await self._redis.delete(self._once_key(sub, delivery))
