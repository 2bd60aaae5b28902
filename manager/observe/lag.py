"""How far behind each consumer group is on each stream, for the coordinator and `status`.

A group's lag is the number of entries in the stream after the group's last delivered ID:
what it still has to read. Redis 7 reports it in XINFO GROUPS, but answers nil when it
cannot know it (e.g. after XDEL of an entry past the group's last delivered one), and
Redis 7.0 over-counts after XTRIM removed entries the group had not read yet (it still
counts them; fixed upstream in redis/redis#13473). Redis 6.2 has no lag field at all.

So, per stream, one XINFO STREAM (constant cost) settles the common cases exactly without
reading entries: a group that is caught up has lag 0, a group behind the stream's first
entry has lag = the stream's length. Otherwise Redis's own lag is used when it is present
and possible (not above the stream's length); else the entries after the last delivered ID
are counted with one XRANGE of at most ``cap + 1`` entries, payloads included. That count
costs network and Redis CPU bounded by ``cap`` entries per group, and a larger backlog is
reported as ``cap`` with ``lag_capped=True``; lower ``cap`` when entries are large.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bus.entry_id import EntryId
from bus.fanout import subscribers
from bus.keys import Keys

#: Default ceiling on the entries read to count one group's lag.
DEFAULT_CAP = 100_000


@dataclass(frozen=True)
class GroupLag:
    """Backlog of one consumer group on one stream.

    ``lag`` is the number of entries not yet delivered to the group (None: unknown, which
    :func:`group_lags` never answers; it counts instead); ``pending`` the delivered but
    unacknowledged ones.
    """

    stream: str
    group: str
    lag: int | None
    pending: int
    consumers: int
    last_delivered_id: str
    #: True when the backlog was larger than the cap: ``lag`` is then the cap, a lower bound.
    lag_capped: bool = False


async def group_lags(
    redis: Redis,
    streams: Iterable[str],
    cap: int = DEFAULT_CAP,
    *,
    only: str | None = None,
    keys: Keys | None = None,
) -> list[GroupLag]:
    """The lag of every consumer group (or only of group ``only``) of each stream key in
    ``streams``, in that order. With ``keys``, also of each group subscribed to a stream,
    read in its inbox (:mod:`bus.fanout`), reported under the stream's key.

    A stream that does not exist (or vanishes while it is being read) is skipped; a key that
    holds something other than a stream raises Redis's WRONGTYPE error.
    """
    if cap < 1:
        raise ValueError(f"cap must be at least 1 entry, got {cap}")
    lags: list[GroupLag] = []
    for stream in streams:
        lags += await _lags_of(redis, stream, stream, cap, only)
        if keys is None:
            continue
        for group in await subscribers(redis, keys, stream):
            if only is None or group == only:
                lags += await _lags_of(redis, keys.inbox(group, stream), stream, cap, group)
    return lags


async def _lags_of(
    redis: Redis, key: str, stream: str, cap: int, only: str | None
) -> list[GroupLag]:
    """The lags of the groups on ``key`` (a stream, or an inbox of it), reported under
    ``stream``."""
    info = await _StreamInfo.read(redis, key)
    if info is None:
        return []
    try:
        groups: Any = await redis.xinfo_groups(key)
    except ResponseError:
        if not await redis.exists(key):
            return []  # deleted since XINFO STREAM
        raise
    lags: list[GroupLag] = []
    for raw in groups:
        group = {_text(k): v for k, v in raw.items()}
        if only is not None and _text(group["name"]) != only:
            continue
        last_id = _text(group["last-delivered-id"])
        reported = group.get("lag")
        lag, capped = await _lag(
            redis,
            key,
            last_id=last_id,
            reported=None if reported is None else int(reported),
            info=info,
            cap=cap,
        )
        lags.append(
            GroupLag(
                stream=stream,
                group=_text(group["name"]),
                lag=lag,
                pending=int(group["pending"]),
                consumers=int(group["consumers"]),
                last_delivered_id=last_id,
                lag_capped=capped,
            )
        )
    return lags


async def stream_keys(redis: Redis, keys: Keys) -> list[str]:
    """Every stream key of the namespace, sorted (SCAN, so Redis is not blocked).

    Under Redis Cluster this scans only the node the client talks to.
    """
    pattern = _glob_escape(keys.stream_prefix()) + "*"
    found: set[str] = set()  # SCAN may return a key more than once
    async for key in redis.scan_iter(match=pattern, count=1000, _type="stream"):
        found.add(_text(key))
    return sorted(found)


@dataclass(frozen=True, slots=True)
class _StreamInfo:
    """What XINFO STREAM says about a stream's extent."""

    length: int
    first_id: str | None
    last_generated_id: str

    @classmethod
    async def read(cls, redis: Redis, stream: str) -> _StreamInfo | None:
        """The stream's extent, or None if there is no such key."""
        try:
            raw: Any = await redis.xinfo_stream(stream)
        except ResponseError:
            if not await redis.exists(stream):
                return None
            raise
        info = {_text(k): v for k, v in raw.items()}
        first = info.get("first-entry")
        return cls(
            length=int(info["length"]),
            first_id=_text(first[0]) if first else None,
            last_generated_id=_text(info["last-generated-id"]),
        )


async def _lag(
    redis: Redis,
    stream: str,
    *,
    last_id: str,
    reported: int | None,
    info: _StreamInfo,
    cap: int,
) -> tuple[int | None, bool]:
    """Entries of ``stream`` after ``last_id`` (see the module docstring); and if capped."""
    if info.first_id is None:
        return 0, False
    last = EntryId.parse(last_id)
    if last >= EntryId.parse(info.last_generated_id):
        return 0, False
    if last < EntryId.parse(info.first_id):
        return info.length, False  # every entry still in the stream is after last_id
    if reported is not None and 0 <= reported <= info.length:
        return reported, False
    rows: Any = await redis.xrange(stream, f"({last_id}", "+", count=cap + 1)
    return (cap, True) if len(rows) > cap else (len(rows), False)


def _text(value: Any) -> str:
    """A reply value as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    """``text`` with SCAN MATCH's special characters taken literally."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)
