"""The reader: takes a consumer's entries from Redis and hands them to its dispatcher.

It drains its own pending entries first (a restarted bot finishes what it had taken), then
reads new ones with a blocking XREADGROUP on a connection of its own, never taking more than
the :class:`~bus.inflight.InFlight` has room for. After a read that failed it first takes
again the entries that read's lost reply may have held (pending under its name since). Its
:class:`GroupKeeper` makes every Redis call of the consumer outlast an outage (backing off)
and a lost group (recreating it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

from redis.asyncio import Redis

from bus.backoff import REDIS_RETRY
from bus.connection import is_cluster, raise_swallowed_cancel
from bus.dispatcher import Dispatcher
from bus.dlq import DeadLetterReason
from bus.entry_id import EntryId
from bus.errors import GroupMissingError
from bus.groups import ensure_group
from bus.held_connection import HeldConnection
from bus.inflight import InFlight
from bus.keys import Keys
from bus.plain_settings import AnyConsumerSettings
from bus.reclaim import Entry
from bus.redis_errors import UNAVAILABLE, is_nogroup


class Stopping(Exception):
    """A retry given up because the consumer is stopping."""


class GroupKeeper:
    """Calls Redis for one consumer until it answers, and keeps its group on its streams.

    :meth:`call` backs off while Redis is unreachable and recreates the group when Redis lost
    it (flushed, or restarted without data). Once ``stopping`` is set it raises
    :class:`Stopping` instead of waiting, but only in the tasks given to :meth:`quit_on_stop`
    (the start and the reader: others, like the acks, keep trying until cancelled).
    """

    def __init__(
        self,
        *,
        redis: Redis,
        group: str,
        streams: Sequence[str],
        start_id: str,
        stopping: asyncio.Event,
        log: Any,
        on_missing: Callable[[Sequence[str], str], None] | None = None,
        keys: Keys | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._group = group
        self._streams = streams
        self._start_id = start_id
        self._stopping = stopping
        self._log = log
        self._on_missing = on_missing
        self._quitters: set[asyncio.Task[Any]] = set()
        self._last_regroup = 0.0

    def quit_on_stop(self, task: asyncio.Task[Any] | None) -> None:
        """Let ``task``'s calls give up (raise :class:`Stopping`) once the consumer stops."""
        if task is not None:
            self._quitters.add(task)

    async def ensure_groups(self, start_id: str | None = None) -> None:
        """Create the group on every stream it reads (idempotent, creating missing streams).

        Existing groups are looked up first: Redis at ``maxmemory`` refuses XGROUP CREATE
        even for a group that exists, and a restarted bot must still start then. Where this
        client may not create a group (a bot's Redis user), the streams missing it go to
        ``on_missing`` (the manager creates it) and :class:`GroupMissingError` is raised, so
        :meth:`call` backs off and looks again.
        """
        start_id = start_id or self._start_id
        missing: list[str] = []
        error: GroupMissingError | None = None
        for stream in self._streams:
            try:
                await ensure_group(self._redis, stream, self._group, start_id)
            except GroupMissingError as exc:
                missing.append(stream)
                error = exc
        if error is not None:
            if self._on_missing is not None:  # the manager subscribes inboxes by stream
                routed = [self._keys.routed_stream(s) for s in missing] if self._keys else missing
                self._on_missing(routed, start_id)
            raise error

    async def call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Call Redis until it answers: back off while it is away, recreate a lost group."""
        waits = REDIS_RETRY.waits()
        failing = False
        while True:
            try:
                result = await func(*args, **kwargs)
                raise_swallowed_cancel()
            except Exception as exc:
                failure: Exception = exc
                try:
                    if is_nogroup(exc):
                        await self._regroup()
                        continue
                except GroupMissingError as missing:
                    failure = missing
                self._report(failure, first=not failing)
                failing = True
            else:
                if failing:
                    self._log.info("redis reachable again; resuming")
                return result
            if self._stopping.is_set() and asyncio.current_task() in self._quitters:
                raise Stopping  # the reader does not wait for Redis to come back to stop
            await asyncio.sleep(next(waits))

    def _report(self, exc: Exception, *, first: bool) -> None:
        """Log a failed call: an outage or a missing group once, anything else every time."""
        if isinstance(exc, UNAVAILABLE):
            if first:
                self._log.warning("redis unavailable; backing off", error=str(exc))
        elif isinstance(exc, GroupMissingError):
            if first:
                self._log.warning("consumer group missing", error=str(exc))
        else:
            self._log.error("unexpected redis error; backing off", exc_info=exc)

    async def _regroup(self) -> None:
        """The group vanished (Redis flushed or restarted empty): recreate it from the start."""
        since = time.monotonic() - self._last_regroup
        if since < 1.0:
            await asyncio.sleep(1.0 - since)
        self._last_regroup = time.monotonic()
        self._log.error(
            "consumer group missing (Redis flushed or restarted without data?): recreating it "
            "at the start of each stream",
            streams=self._streams,
        )
        await self.ensure_groups(start_id="0")

    def __repr__(self) -> str:
        return f"<GroupKeeper group={self._group} streams={len(self._streams)}>"


class Reader:
    """Reads one consumer's entries (its pending ones first) into its dispatcher.

    :meth:`connect` opens its connection, :meth:`start` starts the read loop, :meth:`stop`
    wakes and ends it, :meth:`close` closes the connection. :meth:`take_pending` takes
    re-delivered entries (its own drained, or others' reclaimed).
    """

    def __init__(
        self,
        *,
        redis: Redis,
        group: str,
        consumer: str,
        streams: Sequence[str],
        settings: AnyConsumerSettings,
        keeper: GroupKeeper,
        dispatcher: Dispatcher,
        inflight: InFlight,
        stopping: asyncio.Event,
        stats: dict[str, int],
        log: Any,
    ) -> None:
        self._redis = redis
        self._group = group
        self._consumer = consumer
        self._log = log
        self._streams = streams
        self._settings = settings
        self._keeper = keeper
        self._dispatcher = dispatcher
        self._inflight = inflight
        self._stopping = stopping
        self._stats = stats
        #: The connection the blocking reads hold (None on a cluster: see :meth:`connect`).
        self._held: HeldConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Per stream, the newest entry id this consumer took (read, drained or claimed).
        self._last_taken: dict[str, str] = {}
        #: A read failed: its reply may have been lost with entries in it.
        self._unsure = False

    # -- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> bool:
        """Open the reader's own connection (its blocking reads hold it); False if the
        consumer stopped before Redis could be reached.

        On a Redis Cluster there is no connection of its own: each stream has its own hash
        slot and one XREADGROUP may not span two, so each stream gets its own read loop, and
        the cluster client gives each blocking read a connection to the stream's node.
        """
        if is_cluster(self._redis):
            initialize: Any = getattr(self._redis, "initialize")  # noqa: B009 - RedisCluster's
        else:
            self._held = HeldConnection(self._redis)
            initialize = self._held.connect
        with suppress(Stopping):
            await self._keeper.call(initialize)
        return not self._stopping.is_set()

    async def close(self) -> None:
        """Give the reader's connection back to the pool."""
        if self._held is not None:
            await self._held.release()

    def start(self, tg: asyncio.TaskGroup) -> asyncio.Task[None]:
        """Start the read loop in ``tg`` (after :meth:`connect`); it ends at :meth:`stop`.
        On a cluster, one loop per stream; the task returned is the first."""
        groups = [list(self._streams)] if self._held else [[s] for s in self._streams]
        for streams in groups:
            task = tg.create_task(self._read_loop(streams))
            self._keeper.quit_on_stop(task)
            self._tasks.append(task)
        return self._tasks[0]

    async def stop(self) -> None:
        """End the read loop, cancelling its blocking XREADGROUP.

        A bot's Redis user may not run CLIENT UNBLOCK (it would wake any client), so the read
        is cancelled: redis-py then drops the connection. An entry Redis handed this consumer
        at that very moment stays pending under its name, where the next start of this
        consumer (or another replica's reclaim) takes it: nothing is lost. Entries already
        read are dispatched before the loop awaits again, so none is half taken.
        """
        running = [task for task in self._tasks if not task.done()]
        if not running:
            return
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=self._settings.block_ms / 1000 + 1)

    # -- reading -------------------------------------------------------------------------

    async def _read_loop(self, streams: Sequence[str]) -> None:
        with suppress(Stopping):
            await self._read_entries(streams)

    async def _read_entries(self, read: Sequence[str]) -> None:
        keeper, inflight, dispatcher, last = (
            self._keeper, self._inflight, self._dispatcher, self._last_taken
        )  # fmt: skip
        await keeper.call(self._drain_own_pending, read)
        # XREADGROUP GROUP <group> <consumer> COUNT <n> BLOCK <ms> STREAMS <keys> <ids>
        head = ["XREADGROUP", "GROUP", self._group, self._consumer]
        tail = ["BLOCK", self._settings.block_ms, "STREAMS", *read, *[">"] * len(read)]
        while not self._stopping.is_set():
            await inflight.wait_for_room()
            if self._stopping.is_set():
                break
            count = max(1, min(self._settings.read_count, inflight.free))
            response = await keeper.call(self._read_new, read, *head, "COUNT", count, *tail)
            if not response:
                continue
            for stream, entries in response:
                for entry_id, fields in entries:
                    dispatcher.dispatch(stream, entry_id, fields)
                last[stream] = entries[-1][0]  # ">" hands out ever newer entries
            dispatcher.hand_out()
            # Let the workers start the handlers before the next read is sent: sending it
            # first put its cost (tens of µs) before every handler of the batch.
            await asyncio.sleep(0)

    async def _read_new(self, streams: Sequence[str], *command: Any) -> Any:
        """Send one read of new entries (``command``), first taking again what a failed
        read may have left: Redis makes a read's entries pending as it sends the reply, so
        a reply lost with its connection left them pending under this consumer's name,
        where nothing would take them before the visibility timeout. They are the only
        ones it holds past the newest entry it took, which is where they are read from."""
        if self._unsure:
            if retaken := await self._drain_own_pending(streams, self._last_taken):
                self._stats["retaken"] += retaken
                self._log.info("took again the entries a lost read reply held", entries=retaken)
            self._unsure = False
        try:
            # Tried once (no retry policy under it): a failure must reach this method. On a
            # cluster, the client routes the read to the node of its (one) stream, and its
            # own retries may hide a lost reply (the reclaimer takes those entries later).
            if self._held is not None:
                return await self._held.execute_once(*command)
            return await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]
        except Exception:
            self._unsure = True
            raise

    async def _drain_own_pending(
        self, streams: Sequence[str], after: Mapping[str, str] | None = None
    ) -> int:
        """Re-take entries this consumer name holds pending: all (a restart), or those
        past ``after``'s entry id of each stream; return how many."""
        taken = 0
        for stream in streams:
            last = (after or {}).get(stream, "0")
            while not self._stopping.is_set():
                await self._inflight.wait_for_room()
                response = await self._redis.xreadgroup(
                    self._group, self._consumer, {stream: last}, count=self._settings.read_count
                )
                got: Any = response
                entries: list[Entry] = got[0][1] if got else []
                if not entries:
                    break
                self._stats["drained"] += len(entries)
                taken += len(entries)
                await self.take_pending(stream, entries)
                last = entries[-1][0]
        return taken

    async def take_pending(
        self, stream: str, entries: Sequence[Entry], previous: Mapping[str, str] | None = None
    ) -> None:
        """Dispatch re-delivered entries, dead-lettering those delivered too many times.
        ``previous``: entry id → the consumer it was taken over from."""
        self._note_taken(stream, entries)
        entries = [e for e in entries if (stream, e[0]) not in self._inflight]
        if not entries:
            return
        rows: Any = await self._redis.xpending_range(
            stream,
            self._group,
            entries[0][0],
            entries[-1][0],
            len(entries) * 2 + 10,
            self._consumer,
        )
        counts = {row["message_id"]: row["times_delivered"] for row in rows}
        most = self._settings.max_deliveries
        before = previous or {}
        for entry_id, fields in entries:
            delivered = counts.get(entry_id, 1)
            if fields and delivered > most:
                error = (
                    f"{DeadLetterReason.POISON}:delivered {delivered} times (max_deliveries={most})"
                )
                self._dispatcher.reject(stream, entry_id, fields, None, error, attempts=delivered)
            else:
                self._dispatcher.dispatch(
                    stream, entry_id, fields, delivered, before.get(entry_id, "")
                )
        self._dispatcher.hand_out()

    def _note_taken(self, stream: str, entries: Sequence[Entry]) -> None:
        """Move the newest entry taken on ``stream`` up to the newest of ``entries`` (claimed
        ones may be newer than any read: another replica read them)."""
        if not entries:
            return
        newest = max(EntryId.parse(entry_id) for entry_id, _ in entries)
        known = self._last_taken.get(stream)
        if known is None or newest > EntryId.parse(known):
            self._last_taken[stream] = f"{newest.ms}-{newest.seq}"

    def __repr__(self) -> str:
        return (
            f"<Reader group={self._group} consumer={self._consumer} streams={len(self._streams)}>"
        )
