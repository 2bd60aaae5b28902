"""The dispatcher: routes the entries a consumer took to its handlers, then acks them.

Each entry goes to the worker its ordering key hashes to (same key, same worker, so per-key
order holds while different keys run concurrently), or to a subscription's batcher; the
workers hand it to the :class:`~bus.handling.Runner`. Malformed and poison entries go to the
dead-letter stream the same way. Once every matching handler is done the entry leaves the
:class:`~bus.inflight.InFlight` and is acked in the next batch, unless some outcome was not
final: then it stays pending and is delivered again.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

from bus.acks import AckBatcher
from bus.batching import Batcher
from bus.delivery import Delivery
from bus.delivery_records import DeliveryOutcome, DeliveryRecords
from bus.dlq import DeadLetterReason, DeadLetters
from bus.errors import WireFormatError
from bus.event import Event
from bus.handling import Runner
from bus.hooks import Fence, HandlerObserver
from bus.inflight import InFlight
from bus.keys import Keys
from bus.metrics import GroupMetrics
from bus.plain_settings import AnyConsumerSettings as ConsumerSettings
from bus.redis_errors import UNAVAILABLE
from bus.schemas import SchemaRegistry
from bus.subscription import Allowed, Subscription
from bus.wire import TARGET_FIELD, decode

#: One unit of a worker's work: run ``sub`` on the delivery, or (``sub`` None) dead-letter it
#: with ``"<reason>:<text>"``.
WorkItem = tuple[Subscription | None, Delivery, str]


class Dispatcher:
    """Runs one consumer's subscriptions on the entries it takes, ``concurrency`` at a time.

    The reader calls :meth:`dispatch` (or :meth:`reject`) per entry and :meth:`hand_out`
    once per read. ``with_redis`` is the consumer's retry wrapper, for the acks.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        group: str,
        consumer: str,
        settings: ConsumerSettings,
        subscriptions: Sequence[Subscription],
        streams: Sequence[str],
        schemas: SchemaRegistry,
        dlq: DeadLetters,
        inflight: InFlight,
        with_redis: Callable[..., Awaitable[Any]],
        stats: dict[str, int],
        log: Any,
        meter: GroupMetrics,
        observer: HandlerObserver | None = None,
        allowed: Allowed | None = None,
        fence: Fence | None = None,
        max_data_bytes: int | None = None,
        state: Redis | None = None,
        records: DeliveryRecords | None = None,
    ) -> None:
        self._group = group
        #: What each entry came to, sent with the acks (None: not recorded).
        self._records = records
        self._allowed = allowed
        self._max_data_bytes = max_data_bytes
        # The keys read are the streams, or (under the manager) the group's inboxes of them.
        self._routed = {s: keys.routed_stream(s) for s in streams}
        self._by_stream = {
            s: [sub for sub in subscriptions if self._routed[s] in sub.streams] for s in streams
        }
        self._inflight = inflight
        self._with_redis = with_redis
        self._stats = stats
        self._log = log
        self._runner = Runner(
            redis=state or redis,  # run-once markers: the bot's own keys
            keys=keys,
            dlq=dlq,
            schemas=schemas,
            group=group,
            consumer=consumer,
            visibility_timeout=settings.visibility_timeout,
            on_done=self._done,
            stats=stats,
            log=log,
            observer=observer,
            meter=meter,
            fence=fence,
        )
        # Each worker gets lists of items: one wake-up per worker per read, not per entry.
        self._staged: dict[int, list[WorkItem]] = {}
        self._queues: list[asyncio.Queue[list[WorkItem]]] = [
            asyncio.Queue() for _ in range(settings.concurrency)
        ]
        self._round_robin = itertools.cycle(range(settings.concurrency))
        self._batchers = {
            sub: Batcher(sub, self._runner.run_batch) for sub in subscriptions if sub.batch_size
        }
        self._acks = AckBatcher(redis, group, meter, records)
        #: The workers' and batchers' tasks: a stop ends them before its last flush.
        self._handling: list[asyncio.Task[None]] = []
        # Set when nothing is in flight and no ack waits: a stop may end.
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """Start the workers, the batchers and the ack loop in ``tg``; return their tasks."""
        self._handling = [tg.create_task(self._work(q)) for q in self._queues]
        self._handling += [tg.create_task(b.run()) for b in self._batchers.values()]
        return [*self._handling, tg.create_task(self._ack_loop())]

    async def finish(self, timeout: float) -> None:  # noqa: ASYNC109 - a grace period
        """Run what the batchers hold, wait up to ``timeout`` for the entries in flight,
        end the handlers still running, then send the acks (after a flush already on its
        way, never cancelling it between the records and the acks); what is unfinished or
        unacked stays pending."""
        for batcher in self._batchers.values():
            batcher.flush_now()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            self._log.warning(
                "stop timeout: unfinished events stay pending for the next start",
                unfinished=len(self._inflight),
            )
        # No outcome may come in after the last flush: its ack would never be sent.
        for task in self._handling:
            task.cancel()
        await asyncio.gather(*self._handling, return_exceptions=True)
        try:
            await self._flush_acks()
        except UNAVAILABLE as exc:
            self._log.warning("final acks failed; those entries stay pending", error=str(exc))
        await self._acks.close()

    # -- routing -------------------------------------------------------------------------

    def dispatch(
        self,
        stream: str,
        entry_id: str,
        fields: Mapping[str, str] | None,
        attempts: int = 1,
        previous: str = "",
    ) -> None:
        """Route one entry to the workers of the subscriptions that want it, or ack it.

        ``attempts``: how many times Redis delivered it; ``previous``: the consumer it was
        taken over from."""
        if (stream, entry_id) in self._inflight:
            return
        if not fields:  # deleted from the stream while pending
            self._acks.add(stream, entry_id)
            return
        only_handler = None
        target = fields.get(TARGET_FIELD)
        if target:
            target_group, _, only_handler = target.partition("/")
            if target_group != self._group:
                self._acks.add(stream, entry_id)
                return
        try:
            routed = self._routed.get(stream, stream)
            event = decode(fields, routed, entry_id, max_data_bytes=self._max_data_bytes)
        except WireFormatError as exc:
            self.reject(
                stream, entry_id, fields, None, f"{DeadLetterReason.MALFORMED}:{exc.reason}"
            )
            return
        try:
            allowed = self._allowed is None or self._allowed.allows(event)
            matched = [
                sub
                for sub in self._by_stream.get(stream, ())
                if allowed and (not only_handler or sub.name == only_handler) and sub.accepts(event)
            ]
        except Exception as exc:  # a callable where= raised
            error = f"{DeadLetterReason.HANDLER_ERROR}:where= raised {exc!r}"
            self.reject(stream, entry_id, fields, event, error)
            return
        if not matched:
            self._stats["skipped"] += 1
            self._acks.add(stream, entry_id)
            if self._records is not None and self._wanted_type(stream, event, only_handler):
                skipped = Delivery(stream, entry_id, fields, event, 0, attempts=attempts)
                skipped.previous, skipped.retry = previous, bool(target)
                self._records.add(skipped, DeliveryOutcome.SKIPPED)
            return
        delivery = self._take(stream, entry_id, fields, event, len(matched))
        delivery.attempts, delivery.previous, delivery.retry = attempts, previous, bool(target)
        for sub in matched:
            batcher = self._batchers.get(sub)
            if batcher is not None:
                batcher.add(delivery)
            else:
                self._put(sub, delivery, "")

    def _wanted_type(self, stream: str, event: Event, only_handler: str | None) -> bool:
        """Whether a subscription (the targeted one, if any) takes ``event``'s type: then
        skipping it was its ``where`` conditions' doing, and is recorded."""
        return any(
            sub.pattern.matches(event.type)
            for sub in self._by_stream.get(stream, ())
            if not only_handler or sub.name == only_handler
        )

    def reject(
        self,
        stream: str,
        entry_id: str,
        fields: Mapping[str, str],
        event: Event | None,
        error: str,
        *,
        attempts: int = 1,
    ) -> None:
        """Dead-letter an entry no handler runs on; ``error`` is ``"<reason>:<text>"``."""
        delivery = self._take(stream, entry_id, fields, event, 1)
        delivery.attempts = attempts
        self._put(None, delivery, error)

    def hand_out(self) -> None:
        """Give each worker what the entries dispatched since the last call staged for it."""
        for index, items in self._staged.items():
            self._queues[index].put_nowait(items)
        self._staged = {}

    def _take(
        self, stream: str, entry_id: str, fields: Mapping[str, str], event: Event | None, n: int
    ) -> Delivery:
        self._idle.clear()
        return self._inflight.take(stream, entry_id, fields, event, n)

    def _put(self, sub: Subscription | None, delivery: Delivery, error: str) -> None:
        key = delivery.event.key if delivery.event is not None else None
        index = hash(key) % len(self._queues) if key else next(self._round_robin)
        staged = self._staged.get(index)
        if staged is None:
            self._staged[index] = [(sub, delivery, error)]
        else:
            staged.append((sub, delivery, error))

    # -- handling ------------------------------------------------------------------------

    async def _work(self, queue: asyncio.Queue[list[WorkItem]]) -> None:
        runner = self._runner
        while True:
            for sub, delivery, error in await queue.get():
                try:
                    if sub is not None:
                        await runner.run_one(sub, delivery)
                    else:
                        reason, _, text = error.partition(":")
                        await runner.dead_letter_one(delivery, DeadLetterReason(reason), text)
                except asyncio.CancelledError:
                    raise
                except Exception:  # run_one and dead_letter_one report their own failures
                    self._log.exception(
                        "bug while handling an entry; it stays pending", entry_id=delivery.entry_id
                    )

    def _done(self, delivery: Delivery) -> None:
        """A handler (or the dead-lettering) is done with a delivery; the last one acks it,
        unless some outcome was not final: then it stays pending, and the reclaimer delivers
        it again once it has been idle for the visibility timeout."""
        delivery.remaining -= 1
        if delivery.remaining > 0:
            return
        inflight = self._inflight
        if delivery.keep:
            self._stats["kept_pending"] += 1
            self._log.warning(
                "entry not acked: it is delivered again after the visibility timeout",
                entry_id=delivery.entry_id,
                stream=delivery.stream,
            )
            inflight.finish(delivery)
            if self._records is not None:
                self._records.add(delivery, DeliveryOutcome.RETRIED)
                self._acks.wakeup.set()  # sent with the next acks, or now if none wait
            if not inflight and not self._acks.pending:
                self._idle.set()
        else:
            event = delivery.event
            if self._records is not None:
                outcome = (
                    DeliveryOutcome.DEAD_LETTERED
                    if delivery.dead_lettered
                    else DeliveryOutcome.HANDLED
                )
                self._records.add(delivery, outcome)
            self._acks.add(delivery.stream, delivery.entry_id, event.type if event else "")
            inflight.finish(delivery)

    # -- acks ----------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._acks.wakeup.wait()
            # One turn of the loop first: the handlers finishing in this one are acked in
            # the same XACK (under load a batch's worth, instead of one command each).
            await asyncio.sleep(0)
            await self._with_redis(self._flush_acks)

    async def _flush_acks(self) -> None:
        await self._acks.flush()
        self._stats["acked"] = self._acks.acked
        if not self._inflight and not self._acks.pending:
            self._idle.set()

    def __repr__(self) -> str:
        return (
            f"<Dispatcher group={self._group} workers={len(self._queues)} "
            f"batchers={len(self._batchers)} inflight={len(self._inflight)}>"
        )
