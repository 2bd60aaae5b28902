"""The consumer: one process's member of its bot's group on every stream it reads.

It is built from parts that share one :class:`~bus.inflight.InFlight` (the entries taken and
not finished): the :class:`~bus.reader.Reader` takes entries from Redis (its own pending ones
first, then new ones) and recreates the group if Redis lost it; the
:class:`~bus.dispatcher.Dispatcher` runs the handlers (per-key order, bounded concurrency),
dead-letters poison and malformed entries and acks in batches; the
:class:`~bus.reclaim.Reclaimer` keeps long-running entries its own and takes over entries
idle on dead consumers.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog
from redis.asyncio import Redis

from bus.delivery_records import DeliveryRecords
from bus.dispatcher import Dispatcher
from bus.dlq import DeadLetters
from bus.hooks import Fence, HandlerObserver
from bus.inflight import InFlight
from bus.keys import Keys, consumer_name, group_name
from bus.metrics import BusMetrics
from bus.partitions import split_partition
from bus.plain_settings import AnyConsumerSettings
from bus.reader import GroupKeeper, Reader, Stopping
from bus.reclaim import Reclaimer
from bus.schemas import SchemaRegistry
from bus.subscription import Allowed, Subscription

if TYPE_CHECKING:
    from bus.partition_owner import PartitionOwner

log = structlog.get_logger("bus.consumer")


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks until they end (a cancel landing in redis-py's connect can be swallowed)."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)


def _partition_of(stream: str, partitions: Mapping[str, int]) -> bool:
    split = split_partition(stream)
    return split is not None and partitions.get(split[0], 1) > 1


class Consumer:
    """Reads a bot's group on its streams and runs its subscriptions."""

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        settings: AnyConsumerSettings,
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
        state: Redis | None = None,
        inboxes: bool = False,
        partitions: Mapping[str, int] | None = None,
        only: Sequence[str] | None = None,
        stats: dict[str, int] | None = None,
        records: str | None = None,
    ) -> None:
        """``redis`` runs the stream commands; ``state``, when given, the run-once markers
        (a bot's own keys, which the manager gives another Redis user). With ``inboxes``
        (a bot run by the manager) the group is read in its inboxes, which the manager's
        fanout fills from the streams (see :mod:`bus.fanout`), not on the streams.

        ``partitions`` (stream name → N): the partitions of those routes are read one
        replica at a time, each by a consumer of its own that a
        :class:`~bus.partition_owner.PartitionOwner` starts while this replica holds it;
        ``only`` (stream names) is what such a consumer reads.

        ``records``: the outbox the delivery records go to (:mod:`bus.delivery_records`),
        written with ``state``; None: none are kept."""
        self.group = group_name(bot_id)
        self.name = consumer_name(bot_id, instance)
        subs = list(subscriptions)
        routed = sorted({s for sub in subs for s in sub.streams})  # stream keys
        parted = [k for k in routed if _partition_of(keys.stream_name(k), partitions or {})]
        routed = list(only) if only is not None else [k for k in routed if k not in parted]
        read_on = (lambda key: keys.inbox(self.group, key)) if inboxes else (lambda key: key)
        #: The keys the group is read on: the streams, or its inboxes of them.
        self.streams = [read_on(k) for k in routed]
        self._subscriptions = len(subs)
        self._log = log.bind(bot_id=bot_id, group=self.group, consumer=self.name)
        self.stats: dict[str, int] = stats if stats is not None else defaultdict(int)
        self._stopping = asyncio.Event()
        self._stop_timeout = 10.0
        self._ready = ready or asyncio.Event()
        self._inflight = InFlight(max(settings.read_count, settings.concurrency) * 2)
        self._keeper = GroupKeeper(
            redis=redis,
            group=self.group,
            streams=self.streams,
            start_id=settings.start_id,
            stopping=self._stopping,
            log=self._log,
            on_missing=observer.groups_missing if observer is not None else None,
            keys=keys,
        )
        self._dispatcher = Dispatcher(
            redis=redis,
            keys=keys,
            group=self.group,
            consumer=self.name,
            settings=settings,
            subscriptions=subs,
            streams=self.streams,
            schemas=schemas,
            dlq=dlq,
            inflight=self._inflight,
            with_redis=self._keeper.call,
            stats=self.stats,
            log=self._log,
            meter=(metrics or BusMetrics()).group(self.group),
            observer=observer,
            allowed=allowed,
            fence=fence,
            max_data_bytes=max_data_bytes,
            state=state,
            records=DeliveryRecords(state or redis, records, self.name) if records else None,
        )
        self._reader, self._reclaimer = self._reading(redis, settings, bool(records))
        self._owner: PartitionOwner | None = None
        if parted:

            def make(name: str, valid: Callable[[], bool], lost: Callable[[], None]) -> Consumer:
                def still() -> bool:
                    return valid() and (fence is None or fence.valid())

                def gone() -> None:
                    lost()
                    if fence is not None and not fence.valid():
                        fence.lost()

                return Consumer(
                    redis=redis, keys=keys, settings=settings, bot_id=bot_id, instance=instance,
                    subscriptions=subs, schemas=schemas, dlq=dlq, observer=observer,
                    allowed=allowed, metrics=metrics, fence=Fence(still, gone),
                    max_data_bytes=max_data_bytes, state=state, inboxes=inboxes,
                    only=[keys.stream(name)], stats=self.stats, records=records,
                )  # fmt: skip

            from bus.partition_owner import PartitionOwner  # noqa: PLC0415 - partitioned only

            self._owner = PartitionOwner(
                redis=state or redis, streams=redis, keys=keys, bot_id=bot_id, member=self.name,
                group=self.group, partitions=[keys.stream_name(k) for k in parted],
                read_keys=lambda name: read_on(keys.stream(name)), make_consumer=make,
                ttl=settings.partition_ttl,
            )  # fmt: skip

    def _reading(
        self, redis: Redis, settings: AnyConsumerSettings, track_owners: bool
    ) -> tuple[Reader, Reclaimer]:
        """The reader and the reclaimer: they take entries from Redis into the dispatcher."""
        reader = Reader(
            redis=redis,
            group=self.group,
            consumer=self.name,
            streams=self.streams,
            settings=settings,
            keeper=self._keeper,
            dispatcher=self._dispatcher,
            inflight=self._inflight,
            stopping=self._stopping,
            stats=self.stats,
            log=self._log,
        )
        reclaimer = Reclaimer(
            redis=redis,
            group=self.group,
            consumer=self.name,
            streams=self.streams,
            settings=settings,
            inflight=self._inflight,
            stats=self.stats,
            log=self._log,
            take=reader.take_pending,
            with_redis=self._keeper.call,
            track_owners=track_owners,
        )
        return reader, reclaimer

    async def ensure_groups(self, start_id: str | None = None) -> None:
        """Create the group on every stream it reads (idempotent, creating missing streams)."""
        await self._keeper.ensure_groups(start_id)

    async def run(self) -> None:
        """Consume until :meth:`stop`; then let in-flight handlers finish (bounded) and ack."""
        if self._owner is None:
            await self._run()
            return
        owner = asyncio.create_task(self._owner.run())
        try:
            if self.streams:
                await self._run()
            else:
                self._ready.set()
                self._log.info("consumer started", partitions=True)
                await self._stopping.wait()
        finally:
            self._owner.stop()
            await asyncio.gather(owner, return_exceptions=True)

    async def _run(self) -> None:
        self._keeper.quit_on_stop(asyncio.current_task())
        try:
            await self._keeper.call(self._keeper.ensure_groups)
        except Stopping:  # stopped while Redis could not be used: nothing was taken
            return
        self._ready.set()
        self._log.info("consumer started", streams=self.streams, subscriptions=self._subscriptions)
        try:
            if not await self._reader.connect():
                return
            async with asyncio.TaskGroup() as tg:
                background = self._dispatcher.start(tg)
                background.append(tg.create_task(self._reclaimer.run()))
                self._reader.start(tg)
                await self._stopping.wait()
                await self._reader.stop()
                await self._dispatcher.finish(self._stop_timeout)
                await _cancel_all(background)
        finally:
            await self._reader.close()
        self._log.info("consumer stopped", **self.stats)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking new entries; in-flight handlers get ``timeout`` seconds to finish."""
        self._stop_timeout = timeout
        self._stopping.set()
        self._inflight.open()  # wake a reader waiting for room, so it sees the stop

    def reclaim_now(self) -> None:
        """Look for idle entries now instead of at the next tick (a replica just died)."""
        self._reclaimer.wake()
        if self._owner is not None:
            self._owner.reclaim_now()

    def __repr__(self) -> str:
        return (
            f"<Consumer group={self.group} consumer={self.name} streams={len(self.streams)} "
            f"inflight={len(self._inflight)}>"
        )
