"""The consumer: one process's member of its bot's group on every stream it reads.

It drains its own pending entries first (a restarted bot finishes what it had taken), then
reads new ones, hands each to the worker its ordering key hashes to (same key, same
worker, so per-key order holds while different keys run concurrently), acks in batches
once every matching handler is done, dead-letters poison and malformed entries, and
recreates its group if Redis lost it. Its ``Reclaimer`` (``bus.reclaim``) keeps its
long-running entries its own and hands it entries idle on dead consumers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.acks import AckBatcher
from bus.backoff import REDIS_RETRY
from bus.batching import Batcher
from bus.connection import raise_swallowed_cancel
from bus.dlq import DeadLetterReason, DeadLetters
from bus.errors import WireFormatError
from bus.groups import ensure_group
from bus.handling import Delivery, Fence, HandlerObserver, Runner
from bus.keys import Keys, consumer_name, group_name
from bus.metrics import BusMetrics
from bus.reclaim import Entry, Reclaimer
from bus.redis_errors import UNAVAILABLE, is_nogroup
from bus.schemas import SchemaRegistry
from bus.settings import ConsumerSettings
from bus.subscription import Allowed, Subscription
from bus.wire import TARGET_FIELD, decode

log = structlog.get_logger("bus.consumer")
WorkItem = tuple[Subscription | None, Delivery, str]


class _Stopping(Exception):
    """The reader gives up a retry because the consumer is stopping."""


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks until they end (a cancel landing in redis-py's connect can be swallowed)."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)


class Consumer:
    """Reads a bot's group on its streams and runs its subscriptions."""

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        settings: ConsumerSettings,
        bot_id: str,
        instance: int | str,
        subscriptions: Sequence[Subscription],
        schemas: SchemaRegistry,
        dlq: DeadLetters,
        ready: asyncio.Event | None = None,
        observer: HandlerObserver | None = None,
        allowed: Allowed | None = None,
        metrics: BusMetrics | None = None,
        fence: Fence | None = None,
        max_data_bytes: int | None = None,
    ) -> None:
        self._allowed = allowed
        self._max_data_bytes = max_data_bytes
        self.group = group_name(bot_id)
        meter = (metrics or BusMetrics()).group(self.group)
        self.name = consumer_name(bot_id, instance)
        self._redis = redis
        self._settings = settings
        self._subs = list(subscriptions)
        self.streams = sorted({s for sub in self._subs for s in sub.streams})
        self._by_stream = {s: [sub for sub in self._subs if s in sub.streams] for s in self.streams}
        self._log = log.bind(bot_id=bot_id, group=self.group, consumer=self.name)
        self.stats: dict[str, int] = defaultdict(int)
        self._runner = Runner(
            redis=redis,
            keys=keys,
            dlq=dlq,
            schemas=schemas,
            group=self.group,
            consumer=self.name,
            visibility_timeout=settings.visibility_timeout,
            on_done=self._done,
            stats=self.stats,
            log=self._log,
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
            sub: Batcher(sub, self._runner.run_batch) for sub in self._subs if sub.batch_size
        }
        self._inflight: dict[tuple[str, str], Delivery] = {}
        self._max_inflight = max(settings.read_count, settings.concurrency) * 2
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._acks = AckBatcher(redis, self.group, meter)
        self._stopping = asyncio.Event()
        self._stop_timeout = 10.0
        self._last_regroup = 0.0
        self._ready = ready or asyncio.Event()
        self._reader_id: int | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[Any] | None = None
        self._reclaimer = Reclaimer(
            redis=redis,
            group=self.group,
            consumer=self.name,
            streams=self.streams,
            settings=settings,
            inflight=self._inflight,
            space=self._space,
            stats=self.stats,
            log=self._log,
            take=self._take_pending,
            with_redis=self._with_redis,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def ensure_groups(self, start_id: str | None = None) -> None:
        """Create the group on every stream it reads (idempotent, creating missing streams).

        Existing groups are looked up first: Redis at ``maxmemory`` refuses XGROUP CREATE
        even for a group that exists, and a restarted bot must still start then.
        """
        for stream in self.streams:
            await ensure_group(self._redis, stream, self.group, start_id or self._settings.start_id)

    async def run(self) -> None:
        """Consume until :meth:`stop`; then let in-flight handlers finish (bounded) and ack."""
        self._run_task = asyncio.current_task()
        try:
            await self._with_redis(self.ensure_groups)
        except _Stopping:  # stopped while Redis could not be used: nothing was taken
            return
        self._ready.set()
        self._log.info("consumer started", streams=self.streams, subscriptions=len(self._subs))
        reader_conn = self._redis.client()  # one connection, so CLIENT UNBLOCK can wake it
        try:
            with suppress(_Stopping):
                await self._with_redis(reader_conn.initialize)
            if self._stopping.is_set():
                return
            # After a reconnect (Redis restarted) the reader is a new client with a new id;
            # redis-py calls this back on every (re)connect of the connection (untyped API).
            connection: Any = reader_conn.connection
            connection.register_connect_callback(self._remember_reader_id)
            async with asyncio.TaskGroup() as tg:
                background = [tg.create_task(self._work(q)) for q in self._queues]
                background += [tg.create_task(b.run()) for b in self._batchers.values()]
                background.append(tg.create_task(self._ack_loop()))
                background.append(tg.create_task(self._reclaimer.run()))
                reader = self._reader_task = tg.create_task(self._read_loop(reader_conn))
                await self._stopping.wait()
                await self._stop_reader(reader)
                for batcher in self._batchers.values():
                    batcher.flush_now()
                try:
                    await asyncio.wait_for(self._idle.wait(), self._stop_timeout)
                except TimeoutError:
                    self._log.warning(
                        "stop timeout: unfinished events stay pending for the next start",
                        unfinished=len(self._inflight),
                    )
                try:
                    await self._flush_acks()
                except UNAVAILABLE as exc:
                    self._log.warning(
                        "final acks failed; those entries stay pending", error=str(exc)
                    )
                await _cancel_all(background)
        finally:
            await reader_conn.aclose()
        self._log.info("consumer stopped", **self.stats)

    @property
    def _gives_up_on_stop(self) -> tuple[asyncio.Task[Any] | None, ...]:
        """Tasks whose Redis retries end when the consumer stops (the start and the reader)."""
        return (self._run_task, self._reader_task)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking new entries; in-flight handlers get ``timeout`` seconds to finish."""
        self._stop_timeout = timeout
        self._stopping.set()
        self._space.set()  # wake a reader waiting for room, so it sees the stop

    async def _remember_reader_id(self, connection: Any) -> None:
        """Connect callback of the reader's connection: note its client id for CLIENT UNBLOCK."""
        await connection.send_command("CLIENT", "ID")
        self._reader_id = int(await connection.read_response())

    async def _stop_reader(self, reader: asyncio.Task[None]) -> None:
        """End the read loop: wake its blocking XREADGROUP rather than cancel it mid-command.

        The unblock is repeated because one sent before Redis blocked the read does nothing.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.block_ms / 1000 + 1
        while not reader.done() and loop.time() < deadline:
            if self._reader_id is not None:
                with suppress(*UNAVAILABLE):
                    await self._redis.client_unblock(self._reader_id)
            await asyncio.wait({reader}, timeout=0.1)
        if not reader.done():
            reader.cancel()

    # -- reading -------------------------------------------------------------------------

    async def _read_loop(self, conn: Redis) -> None:
        with suppress(_Stopping):
            await self._read_entries(conn)

    async def _read_entries(self, conn: Redis) -> None:
        await self._with_redis(self._drain_own_pending, conn)
        streams = dict.fromkeys(self.streams, ">")
        while not self._stopping.is_set():
            await self._space.wait()
            if self._stopping.is_set():
                break
            if self._reader_id is None:
                self._reader_id = await self._with_redis(conn.client_id)
            free = self._max_inflight - len(self._inflight)
            try:
                response = await self._with_redis(
                    conn.xreadgroup,
                    self.group,
                    self.name,
                    streams,
                    count=max(1, min(self._settings.read_count, free)),
                    block=self._settings.block_ms,
                )
            except BaseException:
                self._reader_id = None
                raise
            for stream, entries in response or []:
                for entry_id, fields in entries:
                    self._dispatch(stream, entry_id, fields)
            self._hand_out()

    async def _drain_own_pending(self, conn: Redis) -> None:
        """Re-take entries this consumer name had taken before a restart."""
        for stream in self.streams:
            last = "0"
            while not self._stopping.is_set():
                await self._space.wait()
                response = await conn.xreadgroup(
                    self.group, self.name, {stream: last}, count=self._settings.read_count
                )
                got: Any = response
                entries: list[Entry] = got[0][1] if got else []
                if not entries:
                    break
                self.stats["drained"] += len(entries)
                await self._take_pending(stream, entries)
                last = entries[-1][0]

    async def _take_pending(self, stream: str, entries: Sequence[Entry]) -> None:
        """Dispatch re-delivered entries, dead-lettering those delivered too many times."""
        entries = [e for e in entries if (stream, e[0]) not in self._inflight]
        if not entries:
            return
        rows: Any = await self._redis.xpending_range(
            stream, self.group, entries[0][0], entries[-1][0], len(entries) * 2 + 10, self.name
        )
        counts = {row["message_id"]: row["times_delivered"] for row in rows}
        for entry_id, fields in entries:
            delivered = counts.get(entry_id, 1)
            if fields and delivered > self._settings.max_deliveries:
                delivery = self._track(stream, entry_id, fields, None, 1)
                error = (
                    f"delivered {delivered} times (max_deliveries={self._settings.max_deliveries})"
                )
                self._put(None, delivery, str(DeadLetterReason.POISON) + ":" + error)
            else:
                self._dispatch(stream, entry_id, fields)
        self._hand_out()

    def _dispatch(self, stream: str, entry_id: str, fields: Mapping[str, str] | None) -> None:
        """Route one entry to the workers of the subscriptions that want it, or ack it."""
        if (stream, entry_id) in self._inflight:
            return
        if not fields:  # deleted from the stream while pending
            self._ack(stream, entry_id)
            return
        only_handler = None
        target = fields.get(TARGET_FIELD)
        if target:
            target_group, _, only_handler = target.partition("/")
            if target_group != self.group:
                self._ack(stream, entry_id)
                return
        try:
            event = decode(fields, stream, entry_id, max_data_bytes=self._max_data_bytes)
        except WireFormatError as exc:
            delivery = self._track(stream, entry_id, fields, None, 1)
            self._put(None, delivery, f"{DeadLetterReason.MALFORMED}:{exc.reason}")
            return
        try:
            allowed = self._allowed is None or self._allowed.allows(event)
            matched = [
                sub
                for sub in self._by_stream.get(stream, ())
                if allowed and (not only_handler or sub.name == only_handler) and sub.accepts(event)
            ]
        except Exception as exc:  # a callable where= raised
            delivery = self._track(stream, entry_id, fields, event, 1)
            self._put(None, delivery, f"{DeadLetterReason.HANDLER_ERROR}:where= raised {exc!r}")
            return
        if not matched:
            self.stats["skipped"] += 1
            self._ack(stream, entry_id)
            return
        delivery = self._track(stream, entry_id, fields, event, len(matched))
        for sub in matched:
            batcher = self._batchers.get(sub)
            if batcher is not None:
                batcher.add(delivery)
            else:
                self._put(sub, delivery, "")

    def _track(
        self, stream: str, entry_id: str, fields: Mapping[str, str], event: Any, n: int
    ) -> Delivery:
        delivery = Delivery(stream, entry_id, fields, event, n)
        self._inflight[(stream, entry_id)] = delivery
        self._idle.clear()
        if len(self._inflight) >= self._max_inflight:
            self._space.clear()
        return delivery

    def _put(self, sub: Subscription | None, delivery: Delivery, error: str) -> None:
        key = delivery.event.key if delivery.event is not None else None
        index = hash(key) % len(self._queues) if key else next(self._round_robin)
        staged = self._staged.get(index)
        if staged is None:
            self._staged[index] = [(sub, delivery, error)]
        else:
            staged.append((sub, delivery, error))

    def _hand_out(self) -> None:
        """Give each worker what the last read staged for it."""
        for index, items in self._staged.items():
            self._queues[index].put_nowait(items)
        self._staged = {}

    # -- handling ------------------------------------------------------------------------

    async def _work(self, queue: asyncio.Queue[list[WorkItem]]) -> None:
        while True:
            for sub, delivery, error in await queue.get():
                try:
                    if sub is not None:
                        await self._runner.run_one(sub, delivery)
                    else:
                        reason, _, text = error.partition(":")
                        await self._runner.dead_letter_one(delivery, DeadLetterReason(reason), text)
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
        self._inflight.pop((delivery.stream, delivery.entry_id), None)
        if delivery.keep:
            self.stats["kept_pending"] += 1
            self._log.warning(
                "entry not acked: it is delivered again after the visibility timeout",
                entry_id=delivery.entry_id,
                stream=delivery.stream,
            )
            if not self._inflight and not self._acks.pending:
                self._idle.set()
        else:
            event = delivery.event
            self._acks.add(delivery.stream, delivery.entry_id, event.type if event else "")
        if len(self._inflight) < self._max_inflight:
            self._space.set()

    # -- acks ----------------------------------------------------------------------------

    def _ack(self, stream: str, entry_id: str) -> None:
        self._acks.add(stream, entry_id)

    async def _ack_loop(self) -> None:
        while True:
            await self._acks.wakeup.wait()
            await self._with_redis(self._flush_acks)

    async def _flush_acks(self) -> None:
        await self._acks.flush()
        self.stats["acked"] = self._acks.acked
        if not self._inflight and not self._acks.pending:
            self._idle.set()

    # -- reclaiming ----------------------------------------------------------------------

    def reclaim_now(self) -> None:
        """Look for idle entries now instead of at the next tick (a replica just died)."""
        self._reclaimer.wake()

    # -- resilience ----------------------------------------------------------------------

    async def _with_redis(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Call Redis until it answers: back off while it is away, recreate a lost group."""
        waits = REDIS_RETRY.waits()
        failing = False
        while True:
            try:
                result = await func(*args, **kwargs)
                raise_swallowed_cancel()
            except UNAVAILABLE as exc:
                if not failing:
                    self._log.warning("redis unavailable; backing off", error=str(exc))
                failing = True
            except Exception as exc:
                if not is_nogroup(exc):
                    self._log.exception("unexpected redis error; backing off")
                else:
                    await self._regroup()
                    continue
            else:
                if failing:
                    self._log.info("redis reachable again; resuming")
                return result
            if self._stopping.is_set() and asyncio.current_task() in self._gives_up_on_stop:
                raise _Stopping  # the reader does not wait for Redis to come back to stop
            await asyncio.sleep(next(waits))

    async def _regroup(self) -> None:
        """The group vanished (Redis flushed or restarted empty): recreate it from the start."""
        since = time.monotonic() - self._last_regroup
        if since < 1.0:
            await asyncio.sleep(1.0 - since)
        self._last_regroup = time.monotonic()
        self._log.error(
            "consumer group missing (Redis flushed or restarted without data?): recreating it "
            "at the start of each stream",
            streams=self.streams,
        )
        await self.ensure_groups(start_id="0")

    def __repr__(self) -> str:
        return (
            f"<Consumer group={self.group} consumer={self.name} streams={len(self.streams)} "
            f"inflight={len(self._inflight)}>"
        )
