"""The fanout: each routed stream's entries copied into the inbox of every group subscribed.

The group commands take any group name, so a bot that could read a shared stream could read
or ack through another group's name (the archiver's included). So a bot's group never lives
on a shared stream: the manager keeps, per routed stream, the set of groups subscribed to it
(``Keys.subscribers``) and copies each entry, under the same entry id, into each one's inbox
(``Keys.inbox``), where that group is the only one. A bot's Redis user reaches its inboxes
and nothing else of the bus.

One script per batch reads the batch with the manager's ``fanout`` group on the stream, adds
each entry to every subscribed inbox and acks it: an entry reaches all of them or, until the
next try, none. So the fanout group's last delivered id is the *pump's position*: every entry
at or below it is in every inbox that was subscribed then. Copies keep the stream's ids, and
XADD refuses an id an inbox already has, so copying again is harmless.

Subscribing a group backfills its fresh inbox from the stream (after ``$``: the pump's
position, ``0``: all the stream holds, or an entry id, as a restore does) up to the pump's
position, in chunks of one script each, and joins the set in the script of the last chunk;
the pump copies the rest. Nothing twice, nothing missed. A group of the former layout, read
on the stream itself, is moved: its inbox starts where it had acked everything, and the old
group is destroyed.

An entry with more fields than a script call can pass on (only a hostile writer makes one) is
not copied, and counted; it is still archived. An inbox that is not a stream any more gets
nothing (counted and logged). Any other refusal (Redis out of memory) stops the batch before
the entry's ack: it stays pending in the fanout group, and the next round copies it where it
is not yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from bus.connection import is_cluster
from bus.entry_id import EntryId
from bus.keys import FANOUT_CONSUMER, FANOUT_GROUP, Keys
from bus.lease import run_script
from bus.periodic import forever
from bus.pump_script import MOST_VALUES, PUMP, SUBSCRIBE, UNSUBSCRIBE
from bus.redis_errors import is_busygroup, is_nogroup
from bus.stream_watch import StreamWatch

log = structlog.get_logger("bus.fanout")


@dataclass(frozen=True, slots=True)
class Pumped:
    """What one pump script did on one stream."""

    read: int
    copied: int
    #: Entries with more fields than a script can pass on: not copied.
    too_big: int
    #: Inbox writes Redis refused for another reason than "already there".
    refused: int
    last: str

    @classmethod
    def of(cls, reply: Any) -> Pumped:
        """From a pump's reply: read, copied, too big, refused, last id."""
        read, copied, too_big, refused = (int(v) for v in reply[:4])
        return cls(read, copied, too_big, refused, _text(reply[4]))


class Fanout:
    """Copies the routed streams' entries into their subscribers' inboxes until cancelled,
    and subscribes and unsubscribes groups. ``streams`` says which stream keys are routed
    (asked again every round, so a reload's new routes are picked up)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        streams: Callable[[], Iterable[str]],
        *,
        batch: int = 500,
        block: float = 1.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._streams = streams
        self._batch = batch
        self._block_ms = max(1, int(block * 1000))
        #: Per stream key, the last entry id pumped (where the next wait reads after).
        self._positions: dict[str, str] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: On a cluster: each stream's blocking XREAD, kept across rounds.
        self._watch = StreamWatch(redis, self._block_ms) if is_cluster(redis) else None
        #: Routed stream keys found holding something else (logged once each).
        self._not_streams: set[str] = set()
        #: Entries copied since this fanout was made, and those too big to copy.
        self.copied = 0
        self.too_big = 0

    def __repr__(self) -> str:
        return f"<Fanout streams={len(self._positions)} copied={self.copied}>"

    # -- pumping ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Pump until cancelled; back off while Redis is unreachable or refuses."""
        try:
            await forever(
                self._round,
                log=log,
                what="fanout",
                waiting="events wait in their streams",
                failed=self.forget,
            )
        finally:
            if self._watch is not None:
                self._watch.close()

    async def _round(self) -> None:
        await self.prepare_new()
        ready = await self._wait()
        for stream in ready:
            await self.pump(stream)
        if not ready:  # a quiet wait: check the positions against the groups
            await self.refresh()

    def forget(self) -> None:
        """Forget the positions (after a failure: a lost group, say): prepare again."""
        self._positions.clear()

    async def prepare_new(self) -> None:
        """Prepare and pump the routed streams not pumped yet (new routes, or all after
        :meth:`forget`)."""
        for stream in sorted(set(self._streams())):
            if stream in self._positions:
                continue
            try:
                await self.prepare(stream)
            except ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):
                    raise
                if stream not in self._not_streams:  # tried again every round, logged once
                    self._not_streams.add(stream)
                    log.error(
                        "a routed stream is not a stream: nothing reaches its subscribers "
                        f"until the key is deleted (redis-cli DEL {stream})",
                        key=stream,
                    )
                continue
            self._not_streams.discard(stream)
            await self.pump(stream)

    async def refresh(self) -> None:
        """Read each prepared stream's position from its group again. The group is the
        truth: a restore moves it (back, even), and a relay's reply may report a position
        from before that; a position held higher than the group's would leave the entries
        between uncopied until the next write to the stream wakes a pump."""
        for stream in list(self._positions):
            group = (await _groups(self._redis, stream)).get(FANOUT_GROUP)
            if group is None:
                del self._positions[stream]  # gone: prepared again next round
            else:
                self._positions[stream] = _text(group["last-delivered-id"])

    def positions(self) -> dict[str, str]:
        """Each prepared stream and the last entry id pumped there: where a wait for more
        reads after (the outbox relay waits on them with its outboxes, in one read)."""
        return dict(self._positions)

    async def prepare(self, stream: str) -> None:
        """Make sure the fanout group is on ``stream``, and learn its position. A new one
        starts where no subscriber misses anything: at the lowest last id of their inboxes
        (copies above it are refused as already there), or at the stream's end."""
        groups = await _groups(self._redis, stream)
        if FANOUT_GROUP not in groups:
            start = await self._lowest_inbox_id(stream)
            try:
                await self._redis.xgroup_create(stream, FANOUT_GROUP, id=start, mkstream=True)
                log.info("fanout group created", stream=stream, start_after=start)
            except ResponseError as exc:
                if not is_busygroup(exc):
                    raise
            groups = await _groups(self._redis, stream)
        self._positions[stream] = str(groups[FANOUT_GROUP]["last-delivered-id"])

    async def _lowest_inbox_id(self, stream: str) -> str:
        lowest: EntryId | None = None
        for group in await subscribers(self._redis, self._keys, stream):
            try:
                info: Any = await self._redis.xinfo_stream(self._keys.inbox(group, stream))
            except ResponseError:
                continue
            last = EntryId.parse(str(info["last-generated-id"]))
            lowest = last if lowest is None else min(lowest, last)
        return "$" if lowest is None else str(lowest)

    async def pump(self, stream: str) -> int:
        """Copy what ``stream`` has beyond the pump's position; how many entries."""
        moved = 0
        while True:
            done = await self._pump_once(stream)
            moved += done.copied
            if done.last:
                self._advance(stream, done.last)
            if done.read < self._batch:
                return moved

    async def _pump_once(self, stream: str) -> Pumped:
        tail = stream.removeprefix(self._keys.stream_prefix())
        args = [FANOUT_GROUP, FANOUT_CONSUMER, self._batch, f"{self._keys.namespace}:inbox:"]
        try:
            reply: Any = await run_script(
                self._redis,
                PUMP,
                [stream, self._keys.subscribers(stream)],
                [*args, tail, MOST_VALUES],
            )
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            await self.prepare(stream)  # the group was lost (Redis flushed, say)
            return Pumped(0, 0, 0, 0, "")
        done = Pumped.of(reply)
        self._count(stream, done)
        return done

    def relay_args(self) -> list[str]:
        """What the outbox relay's script needs to pump for this fanout: the group, its
        consumer, the inbox key prefix and the subscribers' key prefix."""
        keys = self._keys
        subscribers = keys.subscribers(keys.stream_prefix())  # the prefix of each set's key
        return [FANOUT_GROUP, FANOUT_CONSUMER, f"{keys.namespace}:inbox:", subscribers]

    def relayed(self, stream: str, done: Pumped) -> None:
        """Take in what the outbox relay's script pumped of ``stream`` along with the events
        it appended there (:mod:`bus.outbox`): the pump's position moves on, so the wait does
        not wake for entries already in the inboxes."""
        self._count(stream, done)
        if done.last and stream in self._positions:
            self._advance(stream, done.last)

    def _advance(self, stream: str, last: str) -> None:
        """Move the position of ``stream`` to ``last``, never back (the relay and the pump
        answer on different connections, in either order)."""
        if self.ahead(stream, last):
            self._positions[stream] = last

    def _count(self, stream: str, done: Pumped) -> None:
        self.copied += done.copied
        if done.too_big or done.refused:
            self.too_big += done.too_big
            log.error(
                "fanout: entries not copied to every inbox",
                stream=stream,
                too_big=done.too_big,
                refused=done.refused,
            )

    async def _wait(self) -> list[str]:
        """The streams with entries beyond the pump's position, waiting up to ``block``."""
        positions = dict(self._positions)
        if not positions:
            await asyncio.sleep(self._block_ms / 1000)
            return []
        if self._watch is not None:  # a cluster: one read per stream (one slot each)
            found, failed = await self._watch.ready(positions)
            if failed:
                raise next(iter(failed.values()))
            return found
        args = ["COUNT", 1, "BLOCK", self._block_ms, "STREAMS", *positions, *positions.values()]
        # Never decoded: only the keys are looked at, and an entry need not be UTF-8.
        rows: Any = await self._redis.execute_command(  # type: ignore[no-untyped-call]
            "XREAD", *args, **{NEVER_DECODE: True}
        )
        return [_text(key) for key, _ in read_reply(rows)]

    def ahead(self, stream: str, entry_id: str) -> bool:
        """Whether ``entry_id`` is beyond the pump's position on ``stream`` (not yet in the
        inboxes: an XREAD woken by entries the relay's script has pumped since is not)."""
        known = self._positions.get(stream)
        return known is None or EntryId.parse(entry_id) > EntryId.parse(known)

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(
        self, stream: str, group: str, after: str = "$", *, chunk: int = 1000
    ) -> bool:
        """Make ``group`` a subscriber of ``stream``, its inbox starting after ``after``
        (``$``, ``0`` or an entry id); True if it was not one. Idempotent; an existing
        subscription stays as it is (its lost inbox group is recreated at the inbox's
        start)."""
        if after not in ("$", "0"):
            after = str(EntryId.parse(after))
        async with self._lock(stream, group):
            await self.prepare(stream)
            if group in await subscribers(self._redis, self._keys, stream):
                await self._chunk(stream, group, after, first=False, chunk=chunk)
                return False
            old = await _groups(self._redis, stream)
            if group in old:  # the former layout: move it where it had acked everything
                after = await _acked_position(self._redis, stream, group, old[group])
            first = True
            while True:
                done, after = await self._chunk(stream, group, after, first=first, chunk=chunk)
                first = False
                if done:
                    break
            if group in old:
                await self._redis.xgroup_destroy(stream, group)
                log.info("consumer group moved from the stream to its inbox", group=group,
                         stream=stream, starts_after=after)  # fmt: skip
            log.info("group subscribed", group=group, stream=stream)
            return True

    async def _chunk(
        self, stream: str, group: str, after: str, *, first: bool, chunk: int
    ) -> tuple[bool, str]:
        keys = [stream, self._keys.subscribers(stream), self._keys.inbox(group, stream)]
        args = [group, after, chunk, FANOUT_GROUP, "1" if first else "0", MOST_VALUES]
        reply: Any = await run_script(self._redis, SUBSCRIBE, keys, args)
        return bool(int(reply[0])), _text(reply[1])

    async def unsubscribe(self, stream: str, group: str) -> bool:
        """Stop filling ``group``'s inbox of ``stream`` and delete it; whether it was one."""
        async with self._lock(stream, group):
            return await unsubscribe(self._redis, self._keys, stream, group)

    def _lock(self, stream: str, group: str) -> asyncio.Lock:
        return self._locks.setdefault((stream, group), asyncio.Lock())


async def unsubscribe(redis: Redis, keys: Keys, stream: str, group: str) -> bool:
    """Stop filling ``group``'s inbox of ``stream`` and delete it, at once; whether it was
    subscribed."""
    targets = [keys.subscribers(stream), keys.inbox(group, stream)]
    return bool(await run_script(redis, UNSUBSCRIBE, targets, [group]))


async def subscribers(redis: Redis, keys: Keys, stream: str) -> list[str]:
    """The groups subscribed to ``stream``, sorted."""
    members: Any = await redis.smembers(keys.subscribers(stream))
    return sorted(_text(m) for m in members)


async def _groups(redis: Redis, key: str) -> dict[str, dict[str, Any]]:
    try:
        rows: Any = await redis.xinfo_groups(key)
    except ResponseError:  # no such key
        return {}
    return {_text(row["name"]): row for row in rows}


async def _acked_position(redis: Redis, stream: str, group: str, info: dict[str, Any]) -> str:
    """Where ``group`` on ``stream`` had acked every entry at or below."""
    last = EntryId.parse(_text(info["last-delivered-id"]))
    if int(info.get("pending") or 0) > 0:
        summary: Any = await redis.xpending(stream, group)
        if summary.get("min"):
            last = min(last, EntryId.parse(_text(summary["min"])).previous())
    return str(last)


def read_reply(rows: Any) -> list[tuple[Any, Any]]:
    """An XREAD reply as (key, entries) pairs (RESP3 answers a map, RESP2 a list)."""
    return list(rows.items()) if isinstance(rows, dict) else list(rows or [])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
