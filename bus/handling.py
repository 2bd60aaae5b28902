"""Running handlers: retries with backoff, circuit breaker, run-once, dead-lettering."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bus.backoff import REDIS_RETRY
from bus.breaker import BreakerState
from bus.context import current_event
from bus.deadlines import Deadlines
from bus.delivery import Delivery
from bus.dlq import DeadLetterReason, DeadLetters
from bus.errors import FencedError, HandlerTimeoutError, SchemaError
from bus.event import Event
from bus.hooks import Fence, HandlerObserver
from bus.keys import Keys
from bus.metrics import GroupMetrics
from bus.redis_errors import UNAVAILABLE
from bus.run_once import RunOnce
from bus.schemas import SchemaRegistry
from bus.subscription import Subscription
from bus.wire import readable

#: Error replies to a dead-letter write tolerated (with backoff) before the entry is left
#: pending instead.
DEAD_LETTER_REFUSALS = 5


def _summary(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc, limit=-8))


def _failure(error: BaseException) -> tuple[DeadLetterReason, str]:
    """The dead-letter reason and text of a handler's last failure."""
    if isinstance(error, HandlerTimeoutError):
        return DeadLetterReason.TIMEOUT, str(error)
    return DeadLetterReason.HANDLER_ERROR, f"{type(error).__name__}: {error}"


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
        fence: Fence | None = None,
    ) -> None:
        self._fence = fence
        #: Handler timeouts, from one watchdog (see bus.deadlines).
        self._deadlines = Deadlines()
        self._observer = observer
        self._meter = meter or GroupMetrics(group)
        self._dlq = dlq
        self._schemas = schemas
        self._group = group
        self._consumer = consumer
        self._once = RunOnce(redis, keys, group, int(visibility_timeout * 1000), log)
        self._keys = keys
        self._on_done = on_done
        self._stats = stats
        self._log = log

    async def run_one(self, sub: Subscription, delivery: Delivery) -> None:
        """Handle one delivery with one subscription, then report it done.

        It is acked (by whoever ``on_done`` tells) only if the handler succeeded or its dead
        letter was stored; otherwise it is marked ``keep`` and stays pending.
        """
        try:
            if not await self._run_one(sub, delivery):
                delivery.keep = True
        except asyncio.CancelledError:
            delivery.keep = True
            raise
        except FencedError:
            delivery.keep = True
        except Exception:
            delivery.keep = True
            self._log.exception(
                "bug while handling an entry; it stays pending",
                handler=sub.name,
                entry_id=delivery.entry_id,
                stream=delivery.stream,
            )
        finally:
            self._on_done(delivery)

    async def _run_one(self, sub: Subscription, delivery: Delivery) -> bool:
        """True once the outcome is final (handled, dead-lettered, or a duplicate skipped)."""
        event = delivery.event
        assert event is not None
        await self._wait_breaker(sub)
        if sub.idempotent_ttl is not None:
            claimed = await self._once.claim(sub.name, event, delivery.stream, delivery.entry_id)
            if claimed is None:
                return False
            if not claimed:
                self._stats["skipped_duplicates"] += 1
                return True
        try:
            args: tuple[Any, ...] = (event,)
            if sub.model is not None:
                args = (event, self._schemas.parse(sub.model, event.type, event.data))
        except SchemaError as exc:
            await self._forget_once(sub, delivery)
            return await self.dead_letter(
                delivery, DeadLetterReason.SCHEMA, str(exc), handler=sub.name
            )
        self._consumed(delivery)
        started = time.perf_counter()
        try:
            return await self._handle_one(sub, delivery, args, event)
        finally:
            delivery.handler_s += time.perf_counter() - started

    async def _handle_one(
        self, sub: Subscription, delivery: Delivery, args: tuple[Any, ...], event: Event
    ) -> bool:
        while (error := await self._attempts(sub, args, event, [event])) is not None:
            if not self._failed(sub):
                await self._forget_once(sub, delivery)
                return await self.dead_letter(
                    delivery,
                    *_failure(error),
                    handler=sub.name,
                    attempts=sub.retry.max_attempts,
                    tb=_summary(error),
                )
            self._meter.retried(event.type)  # held, not dead-lettered: try after cool-down
            await self._wait_breaker(sub)
        if sub.idempotent_ttl is not None:  # handled: acked even if this failed
            await self._once.mark_done(sub.name, event, delivery.entry_id, sub.idempotent_ttl)
        return True

    async def _forget_once(self, sub: Subscription, delivery: Delivery) -> None:
        if sub.idempotent_ttl is not None and delivery.event is not None:
            await self._once.forget(sub.name, delivery.event, delivery.entry_id)

    async def run_batch(self, sub: Subscription, deliveries: Sequence[Delivery]) -> None:
        """Handle a batch with a batch subscription; on final failure dead-letter each event
        (each one whose dead letter could not be stored stays pending)."""
        events = [d.event for d in deliveries if d.event is not None]
        try:
            await self._wait_breaker(sub)
            for d in deliveries:
                self._consumed(d)
            started = time.perf_counter()
            while (error := await self._attempts(sub, (events,), events[0], events)) is not None:
                if self._failed(sub):
                    for e in events:
                        self._meter.retried(e.type)
                    await self._wait_breaker(sub)
                    continue
                reason, text = _failure(error)
                for d in deliveries:
                    stored = await self.dead_letter(
                        d,
                        reason,
                        f"{text} (batch of {len(events)})",
                        handler=sub.name,
                        attempts=sub.retry.max_attempts,
                        tb=_summary(error),
                    )
                    d.keep = d.keep or not stored
                break
            for d in deliveries:
                d.handler_s += time.perf_counter() - started
        except BaseException as exc:
            for d in deliveries:
                d.keep = True
            if not isinstance(exc, Exception):
                raise
            if not isinstance(exc, FencedError):
                self._log.exception("bug while handling a batch; it stays pending")
        finally:
            for d in deliveries:
                self._on_done(d)

    async def dead_letter_one(
        self, delivery: Delivery, reason: DeadLetterReason, error: str
    ) -> None:
        """Dead-letter a delivery no handler ran on (malformed, poison), then report it done;
        it stays pending if the dead letter could not be stored."""
        try:
            if not await self.dead_letter(delivery, reason, error):
                delivery.keep = True
        except BaseException:
            delivery.keep = True
            raise
        finally:
            self._on_done(delivery)

    async def _attempts(
        self, sub: Subscription, args: tuple[Any, ...], context: Event, events: list[Event]
    ) -> BaseException | None:
        """Call the handler up to max_attempts times; None on success, else the last error."""
        error: BaseException | None = None
        for attempt in range(1, sub.retry.max_attempts + 1):
            self._check_fence(context)
            token = current_event.set(context)
            if self._observer is not None:
                self._observer.started(events)
            started = time.perf_counter()
            try:
                async with self._deadlines.limit(sub.timeout) as limit:
                    await sub.handler(*args)
            except Exception as exc:
                if isinstance(exc, TimeoutError) and limit.expired() and sub.timeout is not None:
                    exc = HandlerTimeoutError(sub.name, sub.timeout)
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

    def _check_fence(self, event: Event) -> None:
        if self._fence is not None and not self._fence.valid():
            self._log.error(
                "lease no longer valid: no handler runs here (another replica may be active)",
                event_id=event.id,
                entry_id=event.entry_id,
            )
            self._fence.lost()
            raise FencedError("this replica's lease expired before the handler could run")

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
    ) -> bool:
        """Write a dead letter; True once it is stored (then the caller may ack the entry).

        While Redis is unreachable it retries until it answers. An error reply (out of
        memory, read-only replica, a failed disk, no permission) is retried a few times,
        then it gives up and returns False: the entry then stays pending and comes back.
        """
        dlq_id = await self._write_dead_letter(
            delivery, reason, error, handler=handler, attempts=attempts, tb=tb
        )
        if dlq_id is None:
            return False
        delivery.dead_lettered = True
        self._stats["dead_lettered"] += 1
        self._meter.dead_lettered(delivery.event.type if delivery.event is not None else "")
        self._log.error(
            "event dead-lettered",
            reason=str(reason),
            dlq_id=dlq_id,
            event_id=readable(delivery.fields.get("id", "")),
            event_type=readable(delivery.fields.get("type", "")),
            handler=handler,
            entry_id=delivery.entry_id,
            stream=delivery.stream,
            error=error,
        )
        return True

    async def _write_dead_letter(
        self,
        delivery: Delivery,
        reason: DeadLetterReason,
        error: str,
        *,
        handler: str,
        attempts: int,
        tb: str,
    ) -> str | None:
        """Add the dead letter to the stream; its id, or None once Redis refused it
        :data:`DEAD_LETTER_REFUSALS` times (it retries for as long as Redis is unreachable)."""
        waits, refusals = REDIS_RETRY.waits(), 0
        while True:
            try:
                return await self._dlq.add(
                    fields=delivery.fields,
                    reason=reason,
                    error=error,
                    stream=self._keys.routed_stream(delivery.stream),  # an inbox's: its stream
                    entry_id=delivery.entry_id,
                    group=self._group,
                    consumer=self._consumer,
                    handler=handler,
                    attempts=attempts,
                    traceback=tb,
                )
            except UNAVAILABLE as exc:
                self._log.warning("dead-letter write failed; retrying", error=str(exc))
            except RedisError as exc:
                refusals += 1
                if refusals >= DEAD_LETTER_REFUSALS:
                    self._log.error(
                        "Redis refuses the dead letter: the entry stays pending and is "
                        "delivered again after the visibility timeout",
                        error=f"{type(exc).__name__}: {exc}",
                        reason=str(reason),
                        entry_id=delivery.entry_id,
                        stream=delivery.stream,
                    )
                    return None
                self._log.warning("Redis refused a dead letter; retrying", error=str(exc))
            await asyncio.sleep(next(waits))
