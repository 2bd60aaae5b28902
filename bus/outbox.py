"""Bots' outboxes, and the manager's relay that moves them to the streams.

A bot run by the manager may not write to a stream: its Redis user may only append to its
own outbox (``Keys.outbox``). The relay takes each outbox entry and, in one script per
batch, appends it to the stream the manager's routing table names for its type (never one
the bot chose), with ``source`` set to the bot the outbox belongs to, then deletes it from
the outbox. So what consumers and the archive see as ``source`` is established by the
system, and a bot cannot trim a stream, set entry ids or write to another bot's stream.

Dead letters take the same path, marked by :data:`~bus.dlq.DEAD_LETTER_MARK`: the relay appends them
to the dead-letter stream with ``group`` set to the bot's group. So do delivery records
(:data:`~bus.delivery_records.DELIVERIES_MARK`), to the deliveries stream.

An entry is moved exactly once: the append and the delete happen in one script, and an entry
still in the outbox after a crash is simply moved by the next relay.

Given the fanout (not on a cluster), the same script also pumps each stream it appended to
into the subscribed inboxes (:mod:`bus.pump_script`), so a bot's event reaches the inboxes in
one hop, not two (the relay's, then the fanout's wake-up and script). It pumps everything the
stream holds beyond the fanout's position, other writers' entries too, so an inbox never gets
a stream's entries out of order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from bus.cluster_relay import NO_WAIT, Durable, TargetNotAStreamError, relay_planned
from bus.connection import is_cluster
from bus.delivery_records import DELIVERIES_MARK
from bus.dlq import DEAD_LETTER_MARK
from bus.fanout import Fanout, Pumped, read_reply
from bus.held_connection import HeldConnection
from bus.keys import Keys, group_name
from bus.lease import run_script
from bus.periodic import forever
from bus.relay_script import RELAY
from bus.routing import Router
from bus.stream_watch import StreamWatch

log = structlog.get_logger("bus.outbox")

#: Most fields an outbox entry may have; a bigger one (a hostile bot's) is dead-lettered
#: without its content, since Lua cannot pass it on in one call.
MAX_FIELDS = 2000

_STREAM_OR_NONE = ("stream", b"stream", "none", b"none")

#: Deletes a removed bot's outbox once the relay emptied it (KEYS[1]); 1: deleted.
_DROP_EMPTY = """
if redis.call('TYPE', KEYS[1]).ok == 'stream' and redis.call('XLEN', KEYS[1]) == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class OutboxRelay:
    """Moves every bot's outbox entries to the streams (runs in the manager, as admin)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        router: Router,
        bots: Callable[[], Iterable[str]],
        *,
        batch: int = 500,
        block: float = 1.0,
        departed_grace: float = 60.0,
        durable: Durable = NO_WAIT,
        fanout: Fanout | None = None,
    ) -> None:
        self._redis = redis
        #: The connection the relay's wait and scripts go on (see :mod:`bus.held_connection`).
        self._own = HeldConnection(redis)
        #: The fanout the relay's script pumps for (one hop from outbox to inboxes); None:
        #: the events wait in their streams for a fanout of their own. Never on a cluster,
        #: where a stream's inboxes live in other slots than the outbox.
        self._fanout = None if is_cluster(redis) else fanout
        #: On a cluster: the replicas a relayed entry must reach before it leaves its outbox.
        self._durable = durable
        self._keys = keys
        self._bots = bots
        self._batch = batch
        self._departed_grace = departed_grace
        #: Bots that left the config while the relay ran → when: their outbox is still
        #: drained for ``departed_grace`` seconds (a stopping process may publish a last
        #: event), then deleted once empty.
        self._departed: dict[str, float] = {}
        #: The configured bots as last seen (None: not yet, drain the leftovers first).
        self._known: frozenset[str] | None = None
        self._block_ms = max(1, int(block * 1000))
        # Each routed name's streams in a row (its partitions in order): a route is the
        # KEYS index of the first and how many there are.
        named = sorted({*router.routes.values(), router.default})
        streams = [s for name in named for s in router.expand(name)]
        self._stream_keys = [keys.stream(s) for s in streams]
        index = {s: streams.index(router.expand(s)[0]) + 4 for s in named}  # after KEYS 1-3

        def route(stream: str) -> list[str | int]:
            return [index[stream], len(router.expand(stream))]

        self._route_args: list[str | int] = route(router.default)
        self._routes: list[str | int] = []
        for prefix, stream in sorted(router.routes.items()):
            self._routes += [prefix, *route(stream)]
        #: Outboxes whose key is not a stream (a bot wrote something else there), skipped.
        self._broken: set[str] = set()
        #: Bots whose next entry is bound for a key that is not a stream → that key: their
        #: outbox waits (not watched, which would wake the relay again and again).
        self._held: dict[str, str] = {}
        #: Entries moved since the relay was made, for status and tests.
        self.moved = 0
        self._cluster = is_cluster(redis)
        #: On a cluster: each outbox's blocking XREAD, kept across rounds.
        self._watch = StreamWatch(redis, self._block_ms)

    async def run(self) -> None:
        """Relay until cancelled; back off while Redis is unreachable or refuses."""
        self._known = None
        try:
            await forever(
                self._round,
                log=log,
                what="outbox relay",
                waiting="bots' events wait in their outboxes",
                failed=self._fanout.forget if self._fanout else None,
            )
        finally:
            self.close()
            await self._own.release()

    @property
    def drives_fanout(self) -> bool:
        """Whether :meth:`run` also runs the fanout's pumping (then its own run must not):
        one wait for the outboxes and the streams, no wake-up for what the relay pumped."""
        return self._fanout is not None

    async def _round(self) -> None:
        bots = frozenset(self._bots())
        if self._known is None:
            await self.drain_leftovers()
        else:
            now = time.monotonic()
            self._departed.update((bot, now) for bot in self._known - bots)
        self._known = bots
        await self._drain_departed(bots)
        fanout = self._fanout
        if fanout is not None:
            await fanout.prepare_new()
        ready, streams = await self._wait()
        if len(ready) == 1:
            await self.drain(ready[0])
        elif ready:  # one round trip for them all: the last bot's events wait for none
            done = await asyncio.gather(*map(self.drain, ready), return_exceptions=True)
            for result in done:  # each finished; the first failure as itself (Redis away:
                if isinstance(result, BaseException):  # a warning, not a traceback)
                    raise result
        if fanout is not None:
            for stream, first in streams.items():
                if fanout.ahead(stream, first):  # not pumped by the drains just now
                    await fanout.pump(stream)
            if not ready and not streams:  # a quiet wait: check the positions (see refresh)
                await fanout.refresh()

    async def drain_leftovers(self) -> int:
        """Move what waits in the outbox of a bot no longer configured (removed while the
        manager was down, its events published before): they are still the bot's events.
        Its emptied outbox is then deleted."""
        prefix = f"{self._keys.namespace}:outbox:"
        configured = set(self._bots())
        moved = 0
        async for key in self._redis.scan_iter(match=f"{prefix}*", count=500, _type="stream"):
            name = _text(key).removeprefix(prefix)
            bot_id = name[1:-1] if name.startswith("{") and name.endswith("}") else ""
            if bot_id and bot_id not in configured:
                moved += await self.drain(bot_id)
                await self._drop_empty(bot_id)
        if moved:
            log.info("relayed the outbox of bots no longer configured", entries=moved)
        return moved

    async def _drain_departed(self, configured: frozenset[str]) -> None:
        for bot, left in list(self._departed.items()):
            if bot in configured:  # back in the config: relayed as any bot
                del self._departed[bot]
                continue
            await self.drain(bot)
            if time.monotonic() - left >= self._departed_grace:
                await self._drop_empty(bot)
                del self._departed[bot]

    async def _drop_empty(self, bot_id: str) -> None:
        """Delete a departed bot's emptied outbox; on a cluster, forget its relay cursors
        too (its outbox is gone: a new one starts afresh, whatever its ids)."""
        dropped: Any = await run_script(self._redis, _DROP_EMPTY, [self._keys.outbox(bot_id)], [])
        if int(dropped) and self._cluster:
            for target in [self._keys.dead_letters(), self._keys.deliveries(), *self._stream_keys]:
                await self._redis.hdel(self._keys.relay_cursor(target), bot_id)

    def script_call(self, bot_id: str) -> tuple[list[str], list[str | int]]:
        """The KEYS and ARGV of the relay's script (:data:`~bus.relay_script.RELAY`) for
        one batch of ``bot_id``'s outbox."""
        outbox = self._keys.outbox(bot_id)
        keys = [outbox]
        if not self._cluster:
            keys += [self._keys.dead_letters(), self._keys.deliveries(), *self._stream_keys]
        args: list[str | int] = [bot_id, group_name(bot_id), self._batch, self._route_args[0]]
        args += [DEAD_LETTER_MARK, MAX_FIELDS * 2, self._keys.stream_prefix()]
        args += [self._route_args[1], DELIVERIES_MARK]
        args += self._fanout.relay_args() if self._fanout else ["", "", "", ""]
        args += self._routes
        return keys, args

    async def drain(self, bot_id: str) -> int:
        """Move everything waiting in ``bot_id``'s outbox; how many entries that was."""
        outbox = self._keys.outbox(bot_id)
        targets = [outbox, self._keys.dead_letters(), self._keys.deliveries(), *self._stream_keys]
        keys, args = self.script_call(bot_id)
        moved = 0
        while True:
            blocked = ""
            try:
                reply = await run_script(self._own, RELAY, keys, args)
                if self._cluster:
                    count = await relay_planned(
                        self._redis, self._keys, bot_id, targets, reply, durable=self._durable
                    )
                else:
                    count, blocked = int(reply[0]), _text(reply[1])
                    if self._fanout is not None:
                        for stream, *pumped in reply[2:]:
                            self._fanout.relayed(_text(stream), Pumped.of(pumped))
            except TargetNotAStreamError as exc:
                count, blocked = 0, exc.key
            except ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):
                    raise
                self._broken_outbox(bot_id, outbox)
                return moved
            moved += count
            self.moved += count
            if blocked:
                self._hold(bot_id, blocked)
                return moved
            if count < self._batch:
                return moved

    def _hold(self, bot_id: str, target: str) -> None:
        """Leave ``bot_id``'s outbox alone while ``target`` is not a stream: its entries up
        to the one bound there moved, that one and the rest wait (in order) until it is."""
        if bot_id not in self._held:
            log.error(
                f"{target} is not a stream: the bot's events wait in its outbox from the "
                f"first one bound there until the key is deleted (redis-cli DEL {target})",
                bot_id=bot_id,
                key=target,
            )
        self._held[bot_id] = target

    async def _wait(self) -> tuple[list[str], dict[str, str]]:
        """The bots with entries in their outbox, waiting up to ``block`` for one; with the
        fanout, in the same read, the streams with entries beyond its position (and the
        first such entry's id)."""
        for key in list(self._broken):  # deleted since (or made a stream): relay it again
            if (await self._redis.type(key)) in _STREAM_OR_NONE:
                self._broken.discard(key)
        for bot, target in list(self._held.items()):
            if (await self._redis.type(target)) in _STREAM_OR_NONE:
                del self._held[bot]
                log.info("relaying the bot's outbox again", bot_id=bot, key=target)
        outboxes = {
            self._keys.outbox(b): b
            for b in self._bots()
            if self._keys.outbox(b) not in self._broken and b not in self._held
        }
        watched = dict.fromkeys(outboxes, "0-0")
        if self._fanout is not None:
            watched |= {k: v for k, v in self._fanout.positions().items() if k not in self._broken}
        if not watched:
            await asyncio.sleep(self._block_ms / 1000)
            return [], {}
        if self._cluster:
            return await self._wait_each(watched, outboxes), {}
        args = ["COUNT", 1, "BLOCK", self._block_ms, "STREAMS", *watched, *watched.values()]
        try:
            # Never decoded: an entry a bot wrote need not be UTF-8.
            rows: Any = await self._own.execute_command("XREAD", *args, **{NEVER_DECODE: True})
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            await self._find_broken(watched, outboxes)
            return [], {}
        ready, streams = [], {}
        for key, entries in read_reply(rows):
            name = _text(key)
            if name in outboxes:
                ready.append(outboxes[name])
            elif entries:
                streams[name] = _text(entries[0][0])
        return ready, streams

    async def _find_broken(self, watched: dict[str, str], outboxes: dict[str, str]) -> None:
        """After a read refused with WRONGTYPE: set aside the keys that are not streams (a
        bot's outbox a bot's code overwrote, or a stream an admin did) until they are."""
        for key in watched:
            if (await self._redis.type(key)) in _STREAM_OR_NONE:
                continue
            if key in outboxes:
                self._broken_outbox(outboxes[key], key)
            elif key not in self._broken:
                self._broken.add(key)
                log.error(
                    "a routed stream is not a stream: nothing reaches its subscribers until "
                    f"the key is deleted (redis-cli DEL {key})",
                    key=key,
                )

    async def _wait_each(self, watched: dict[str, str], outboxes: dict[str, str]) -> list[str]:
        """:meth:`_wait` on a cluster, where one XREAD cannot span the outboxes' slots."""
        ready, failed = await self._watch.ready(watched)
        for key, error in failed.items():
            if not (isinstance(error, ResponseError) and str(error).startswith("WRONGTYPE")):
                raise error
            self._broken_outbox(outboxes[key], key)
        return [outboxes[key] for key in ready]

    def close(self) -> None:
        """Cancel the reads a cluster relay keeps between rounds."""
        self._watch.close()

    def _broken_outbox(self, bot_id: str, key: str) -> None:
        if key not in self._broken:
            self._broken.add(key)
            log.error(
                "a bot's outbox is not a stream: a bot's code wrote it, and nothing of it is "
                f"relayed until the key is deleted (redis-cli DEL {key})",
                bot_id=bot_id,
                key=key,
            )


async def outbox_backlog(redis: Redis, keys: Keys, bots: Sequence[str]) -> dict[str, int]:
    """Entries waiting in each bot's outbox (XLEN, one pipeline); 0 for a missing one,
    and a key that is no stream (a bot wrote something else there) is left out."""
    if not bots:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for bot in bots:
            pipe.xlen(keys.outbox(bot))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return {
        bot: int(n) for bot, n in zip(bots, replies, strict=True) if not isinstance(n, Exception)
    }


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
