"""Which replica of a bot reads which partition: one at a time, so per-key order holds.

Every replica of a bot that reads partitioned streams (:mod:`bus.partitions`) runs a
:class:`PartitionOwner`. Each round (a third of ``ttl``) it:

1. renews its place among the bot's live replicas (:func:`bus.lease.members`: a sorted set
   scored by the server's clock, so one clock judges every host);
2. works out its share: the partitions, in order, dealt round-robin over the live
   replicas' sorted names. Every replica computes the same deal from the same set;
3. renews the lease of each partition it reads (a fenced :class:`~bus.lease.Lease` per
   partition); one it could not renew is stopped at once, its handlers fenced off;
4. stops reading partitions no longer its share (a new replica came): its consumer
   finishes what it took and acks, and only then is the lease released;
5. takes the leases of its share that are free (their former reader released them, or
   died and their TTL ran out), claims what the former reader left pending, and starts a
   consumer on the partition, which handles those pending entries, in order, before any
   new one.

So a partition is read by one replica at a time, and a replica's death hands its
partitions over within ``ttl`` plus a round. A reader stalled past its lease (a paused
process) runs no further handler: its consumer's fence checks the lease's own deadline,
which passes before Redis lets the lease go.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis

from bus.keys import Keys
from bus.lease import Lease, members
from bus.partitions import split_partition

log = structlog.get_logger("bus.partitions")


class PartitionConsumer(Protocol):
    """What the owner needs of a consumer of one partition (a :class:`~bus.consumer.Consumer`)."""

    async def run(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def reclaim_now(self) -> None: ...


#: Makes the consumer of one partition (by stream name) with the given fence check.
MakeConsumer = Callable[[str, Callable[[], bool], Callable[[], None]], PartitionConsumer]


@dataclass
class _Reading:
    """One partition this replica reads."""

    lease: Lease
    consumer: PartitionConsumer
    task: asyncio.Task[None]
    lost: bool = False
    stopping: asyncio.Task[None] | None = field(default=None)


def deal(partitions: Sequence[str], live: Sequence[str], me: str) -> list[str]:
    """``me``'s share of ``partitions``: dealt in order, round-robin over ``live`` (sorted).
    All of them when ``me`` is not yet among ``live``'s names: none, then."""
    if me not in live:
        return []
    ordered = sorted(partitions, key=_order)
    seat = sorted(live).index(me)
    return [p for n, p in enumerate(ordered) if n % len(live) == seat]


def _order(stream: str) -> tuple[str, int]:
    split = split_partition(stream)
    return split if split is not None else (stream, -1)


class PartitionOwner:
    """Holds this replica's share of its bot's partitions (see the module)."""

    def __init__(
        self,
        *,
        redis: Redis,
        streams: Redis,
        keys: Keys,
        bot_id: str,
        member: str,
        group: str,
        partitions: Sequence[str],
        read_keys: Callable[[str], str],
        make_consumer: MakeConsumer,
        ttl: float,
        stop_timeout: float = 10.0,
    ) -> None:
        """``redis``: the bot's own keys (leases, members); ``streams``: its group's (the
        claims); ``read_keys`` gives the key a partition is read on (its inbox, or the
        stream)."""
        self._redis = redis
        self._streams = streams
        self._keys = keys
        self._bot_id = bot_id
        self._member = member
        self._group = group
        self._partitions = list(partitions)
        self._read_key = read_keys
        self._make = make_consumer
        self._ttl = ttl
        self._stop_timeout = stop_timeout
        self._reading: dict[str, _Reading] = {}
        self._log = log.bind(bot_id=bot_id, consumer=member)
        self._stopping = asyncio.Event()
        #: Partitions read now, for status and tests.
        self.held: set[str] = set()

    def __repr__(self) -> str:
        return f"<PartitionOwner {self._member} reads {sorted(self._reading)}>"

    async def run(self) -> None:
        """Rounds until :meth:`stop`; then stop every consumer, release, leave."""
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                try:
                    await self._round()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away: keep what we read, until its lease says
                    self._log.warning("partition round failed; retrying", error=str(exc))
                    self._fence_expired()
                wait = self._ttl / 3 - (time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), max(0.05, wait))
        finally:
            await self._leave()

    def stop(self) -> None:
        """End the rounds (the run then stops the consumers, releases and leaves)."""
        self._stopping.set()

    def reclaim_now(self) -> None:
        """Ask each partition's consumer to look for idle entries now."""
        for reading in self._reading.values():
            reading.consumer.reclaim_now()

    async def _round(self) -> None:
        live = await members(self._redis, self._keys, self._bot_id, self._member, self._ttl)
        share = set(deal(self._partitions, live, self._member))
        for stream, reading in list(self._reading.items()):
            if reading.task.done():  # stopped after its lease was lost, or it failed
                await self._drop(stream)
            elif reading.lost:
                continue  # stopping: dropped once its consumer ended
            elif not await reading.lease.renew():
                self._lose(stream, reading)
            elif stream not in share:
                await self._hand_over(stream)
        for stream in sorted(share - set(self._reading), key=_order):
            await self._take(stream)
        self.held = set(self._reading)

    async def _take(self, stream: str) -> None:
        lease = Lease(
            self._redis, self._keys, self._bot_id, self._member, self._ttl,
            key=self._keys.partition_lease(self._bot_id, stream),
        )  # fmt: skip
        if not await lease.try_acquire():
            return  # its former reader still has it: next round
        claimed = await self._claim(stream)
        reading: _Reading

        def lost() -> None:
            self._lose(stream, reading)

        consumer = self._make(stream, lambda: lease.held and not reading.lost, lost)
        reading = _Reading(lease, consumer, asyncio.create_task(consumer.run()))
        self._reading[stream] = reading
        self._log.info("partition taken", partition=stream, token=lease.token, claimed=claimed)

    async def _claim(self, stream: str) -> int:
        """Make what the partition's former readers left pending ours (their consumer
        stopped, or its lease ran out): our consumer handles it first, in order."""
        key = self._read_key(stream)
        after, claimed = "-", 0
        while True:
            try:
                rows: Any = await self._streams.xpending_range(key, self._group, after, "+", 500)
            except Exception as exc:
                if "NOGROUP" in str(exc):  # nothing read there yet
                    return claimed
                raise
            theirs = [r["message_id"] for r in rows if _text(r["consumer"]) != self._member]
            if theirs:
                await self._streams.xclaim(key, self._group, self._member, 0, theirs, justid=True)
                claimed += len(theirs)
            if len(rows) < 500:
                return claimed
            after = "(" + _text(rows[-1]["message_id"])

    def _lose(self, stream: str, reading: _Reading) -> None:
        """Another replica may read the partition now: stop at once (no handler runs)."""
        if reading.lost:
            return
        reading.lost = True
        reading.consumer.stop(0)
        self._log.warning("partition lease lost: stopped reading it", partition=stream)

    def _fence_expired(self) -> None:
        for stream, reading in self._reading.items():
            if not reading.lease.held:
                self._lose(stream, reading)

    async def _hand_over(self, stream: str) -> None:
        """Stop reading ``stream`` (its handlers finish, its acks are sent), then release."""
        reading = self._reading[stream]
        reading.consumer.stop(self._stop_timeout)
        await asyncio.wait([reading.task], timeout=self._stop_timeout + 5)
        if not reading.lost:
            await reading.lease.release()
        await self._drop(stream)
        self._log.info("partition handed over", partition=stream)

    async def _drop(self, stream: str) -> None:
        reading = self._reading.pop(stream)
        if not reading.task.done():
            reading.task.cancel()
        await asyncio.gather(reading.task, return_exceptions=True)

    async def _leave(self) -> None:
        for stream in list(self._reading):
            self._reading[stream].consumer.stop(self._stop_timeout)
        tasks = [r.task for r in self._reading.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=self._stop_timeout + 5)
        for stream, reading in list(self._reading.items()):
            with contextlib.suppress(Exception):
                if not reading.lost:
                    await reading.lease.release()
            await self._drop(stream)
        with contextlib.suppress(Exception):
            await members(
                self._redis, self._keys, self._bot_id, self._member, self._ttl, join=False
            )
        self.held = set()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
