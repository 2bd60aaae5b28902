"""What happens to a dead bot process's pending entries: crash-linked poison and handover.

When a bot process dies the manager knows at once (it is the parent). Entries that were in
flight at several consecutive crashes are dead-lettered with the exit statuses, so one bad
event cannot crash-loop a bot forever. The rest of the dead consumer's pending entries are
marked idle at once, so a live replica's next reclaim (which the manager triggers) takes
them instead of waiting for the visibility timeout; with no live replica, the restarted
process (same stable consumer name) drains them first thing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.dlq import DeadLetterReason, DeadLetters
from bus.keys import Keys
from bus.redis_errors import is_nogroup
from manager.observe.lag import stream_keys

log = structlog.get_logger("manager.supervision.handover")
Entry = tuple[str, str]  # (stream key, entry id)
_PAGE = 500


@dataclass
class CrashLedger:
    """Per bot: how many consecutive crashes each entry was in flight at. Pure bookkeeping."""

    threshold: int
    counts: dict[Entry, int] = field(default_factory=dict)
    exits: dict[Entry, list[str]] = field(default_factory=dict)

    def record_crash(self, inflight: Iterable[Entry], exit_status: str) -> list[Entry]:
        """Count a crash; the entries now in flight at ``threshold`` consecutive crashes.

        An entry that was not in flight at this crash starts from zero again; a crash with
        nothing in flight (another replica's, say) says nothing about any entry.
        """
        current = set(inflight)
        if not current:
            return []
        counts: dict[Entry, int] = {}
        exits: dict[Entry, list[str]] = {}
        for entry in current:
            counts[entry] = self.counts.get(entry, 0) + 1
            exits[entry] = [*self.exits.get(entry, []), exit_status]
        self.counts, self.exits = counts, exits
        return [e for e, n in counts.items() if n >= self.threshold]

    def forget(self, entry: Entry) -> None:
        """Drop an entry (it was dead-lettered)."""
        self.counts.pop(entry, None)
        self.exits.pop(entry, None)


async def dead_letter_crashed(
    redis: Redis,
    dlq: DeadLetters,
    *,
    group: str,
    consumer: str,
    entry: Entry,
    exits: list[str],
) -> bool:
    """Move one entry that keeps crashing its bot to the dead-letter stream and ack it."""
    stream, entry_id = entry  # as the bot reports it: the stream, which its group reads in
    key = dlq.keys.group_key(stream, group)  # its inbox (only its own group's is reachable)
    if entry_id not in await pending_of(redis, key, group, consumer):
        return False  # acked or handed over meanwhile: nothing to dead-letter
    rows: Any = await redis.xrange(key, entry_id, entry_id)
    fields = dict(rows[0][1]) if rows else {}
    if fields:
        await dlq.add(
            fields=fields,
            reason=DeadLetterReason.CRASHED,
            error=(
                f"in flight at {len(exits)} consecutive crashes of its bot "
                f"({', '.join(exits)}); dead-lettered so the bot can run"
            ),
            stream=stream,
            entry_id=entry_id,
            group=group,
            consumer=consumer,
            attempts=len(exits),
        )
    acked: Any = await redis.xack(key, group, entry_id)
    log.error(
        "entry crashed its bot repeatedly: dead-lettered",
        group=group,
        stream=stream,
        entry_id=entry_id,
        event_id=fields.get("id"),
        exits=exits,
    )
    return bool(acked)


async def pending_of(redis: Redis, stream: str, group: str, consumer: str) -> list[str]:
    """Entry ids pending on ``consumer`` in ``group`` on ``stream`` ([] if there is no group)."""
    ids: list[str] = []
    start = "-"
    while True:
        try:
            rows: Any = await redis.xpending_range(
                stream, group, start, "+", _PAGE, consumername=consumer
            )
        except Exception as exc:
            if is_nogroup(exc):
                return ids
            raise
        ids += [row["message_id"] for row in rows]
        if len(rows) < _PAGE:
            return ids
        start = "(" + rows[-1]["message_id"]


async def release_pending(
    redis: Redis, stream: str, group: str, consumer: str, idle_ms: int
) -> int:
    """Mark a dead consumer's pending entries idle for ``idle_ms``: free for any reclaim now.

    They stay on the consumer (its restarted process drains them) until a live replica's
    XAUTOCLAIM, which takes entries idle longer than the visibility timeout, takes them.
    """
    ids = await pending_of(redis, stream, group, consumer)
    for start in range(0, len(ids), _PAGE):
        page: list[Any] = list(ids[start : start + _PAGE])
        await redis.xclaim(stream, group, consumer, 0, page, idle=idle_ms, justid=True)
    return len(ids)


async def retire_consumer(redis: Redis, stream: str, group: str, consumer: str) -> bool:
    """Delete ``consumer`` from the group only if it has nothing pending; whether it did."""
    if await pending_of(redis, stream, group, consumer):
        return False
    try:
        await redis.xgroup_delconsumer(stream, group, consumer)
    except Exception as exc:
        if not is_nogroup(exc):
            raise
    return True


async def release_everywhere(
    redis: Redis, keys: Keys, group: str, consumer: str, idle_ms: int
) -> int:
    """:func:`release_pending` on every stream the group reads (its inboxes of them)."""
    released = 0
    for stream in await stream_keys(redis, keys):
        key = keys.group_key(stream, group)
        released += await release_pending(redis, key, group, consumer, idle_ms)
    return released


async def retire_everywhere(redis: Redis, keys: Keys, group: str, consumer: str) -> bool:
    """:func:`retire_consumer` on every stream the group reads; whether it is gone from all."""
    streams = await stream_keys(redis, keys)
    results = [
        await retire_consumer(redis, keys.group_key(stream, group), group, consumer)
        for stream in streams
    ]
    return all(results)
