"""Appending events once, also when a reply is lost.

redis-py sends a command again when its connection fails, and an XADD whose reply was lost
with the connection (a reset, a proxy or NAT closing the socket) had been written: sent
again, the event was on its stream twice, and the publish returned as if all was well.
Here each try is sent once (:meth:`~bus.held_connection.HeldConnection.execute_once`);
after a failed one, the next looks first for what it may have written, by event id, among
the entries added since it was sent (also in the routed stream, where the relay may have
moved an outbox entry already), and sends again only what it does not find. The tries
(a look and a send each, both sent once) and their waits are the connection's own
(``connect_retries``, ``retry_cap``), so a publish fails as soon as it did before.

The look is bounded (:data:`LOOK_MOST` entries per stream, back to the first try's time
less :data:`CLOCK_SKEW_MS`): past it an event is sent again, and may be there twice, as
before. On a Redis Cluster the client retries by itself, and the same holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.backoff import Backoff
from bus.event import Event
from bus.held_connection import HeldConnection, execute_many_once, execute_once
from bus.plain_settings import AnyBusSettings
from bus.redis_errors import UNAVAILABLE

log = structlog.get_logger("bus.publisher")

#: Entries a look reads per stream at most, newest first.
LOOK_MOST = 10_000
#: How far before the first try's time (this host's clock) a look reaches on Redis's.
CLOCK_SKEW_MS = 2_000
_PAGE = 500

#: One event to append: its key (a stream or the outbox), its fields, the event.
Append = tuple[str, Mapping[str, str | bytes], Event]


class Appender:
    """XADDs events on ``held``, once each across lost replies (see the module).

    ``lookup`` reads the routed streams where ``held``'s client may not (a bot's replay
    user); ``routed`` names the stream an event is routed to, for an outbox's events (None:
    events are appended to their streams).
    """

    def __init__(
        self,
        held: HeldConnection,
        redis: Redis,
        settings: AnyBusSettings,
        *,
        lookup: Redis | None = None,
        routed: Callable[[Event], str] | None = None,
    ) -> None:
        self._held = held
        self._redis = redis
        self._lookup = lookup or redis
        self._routed = routed
        self._retries = settings.connect_retries
        self._timeout = settings.command_timeout
        self._backoff = Backoff(base=0.05, cap=settings.retry_cap)

    async def append(self, appends: Sequence[Append]) -> list[str]:
        """Append each event; their entry ids (of the outbox entry or, if the relay had
        moved it before a look found it, of the stream's). Raises the last connection error
        once the tries are spent, a ResponseError at once."""
        started = time.time()
        try:
            return await self._send(appends)
        except UNAVAILABLE as exc:
            return await self._again(appends, started, exc)

    async def _send(self, appends: Sequence[Append]) -> list[str]:
        if len(appends) == 1:
            key, fields, _ = appends[0]
            return [str(await self._held.execute_once("XADD", key, "*", *_flat(fields)))]
        replies = await execute_many_once(
            self._redis, [("XADD", key, "*", *_flat(fields)) for key, fields, _ in appends]
        )
        return [str(reply) for reply in replies]

    async def _again(
        self, appends: Sequence[Append], started: float, error: BaseException
    ) -> list[str]:
        ids: list[str | None] = [None] * len(appends)
        waits = self._backoff.waits()
        for _ in range(self._retries):
            await asyncio.sleep(next(waits))
            try:
                missing = [i for i, found in enumerate(ids) if found is None]
                # A try's time: a new connection's handshake has retries of its own.
                async with asyncio.timeout(self._timeout):
                    landed = await self._landed([appends[i] for i in missing], started)
                for i in missing:
                    ids[i] = landed.get(appends[i][2].id)
                if any(found is not None for found in ids):
                    log.info(
                        "a lost reply's events found written: not sent again",
                        events=sum(found is not None for found in ids),
                    )
                missing = [i for i, found in enumerate(ids) if found is None]
                if missing:
                    async with asyncio.timeout(self._timeout):
                        sent = await self._send([appends[i] for i in missing])
                    for i, entry_id in zip(missing, sent, strict=True):
                        ids[i] = entry_id
                return [str(entry_id) for entry_id in ids]
            except UNAVAILABLE as exc:
                error = exc
        raise error

    def __repr__(self) -> str:
        return f"<Appender retries={self._retries}>"

    async def _landed(self, appends: Sequence[Append], started: float) -> dict[str, str]:
        """Event id → entry id of those of ``appends`` already written since ``started``."""
        since_ms = max(0, int(started * 1000) - CLOCK_SKEW_MS)
        by_key: dict[str, set[str]] = {}
        for key, _, event in appends:
            by_key.setdefault(key, set()).add(event.id)
        found: dict[str, str] = {}
        for key, ids in by_key.items():
            found |= await _look(self._redis, key, ids, since_ms)
        if self._routed is not None:  # the relay may have moved them on
            by_stream: dict[str, set[str]] = {}
            for _, _, event in appends:
                if event.id not in found:
                    by_stream.setdefault(self._routed(event), set()).add(event.id)
            for stream, ids in by_stream.items():
                found |= await _look(self._lookup, stream, ids, since_ms)
        return found


async def _look(redis: Redis, key: str, ids: set[str], since_ms: int) -> dict[str, str]:
    """:func:`_read_back`, or nothing (logged) where Redis refuses the read (a user without
    the right): the events are then sent again, maybe twice, as before."""
    try:
        return await _read_back(redis, key, ids, since_ms)
    except ResponseError as exc:
        log.warning("cannot look for a lost reply's events", key=key, error=str(exc))
        return {}


async def _read_back(redis: Redis, key: str, ids: set[str], since_ms: int) -> dict[str, str]:
    """Event id → entry id of the entries of ``key`` since ``since_ms`` carrying one of
    ``ids``, newest first, reading at most :data:`LOOK_MOST` entries."""
    found: dict[str, str] = {}
    high, read = "+", 0
    while len(found) < len(ids) and read < LOOK_MOST:
        rows: Any = await execute_once(redis, "XREVRANGE", key, high, since_ms, "COUNT", _PAGE)
        for entry_id, fields in rows or []:
            event_id = fields.get("id") if isinstance(fields, dict) else None
            if event_id in ids:
                found.setdefault(event_id, str(entry_id))
        read += len(rows or [])
        if not rows or len(rows) < _PAGE:
            break
        high = f"({rows[-1][0]}"
    return found


def _flat(fields: Mapping[str, str | bytes]) -> list[str | bytes]:
    """An entry's fields as XADD takes them: name, value, name, value …"""
    flat: list[str | bytes] = []
    for name, value in fields.items():
        flat += (name, value)
    return flat
