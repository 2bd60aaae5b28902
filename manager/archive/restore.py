"""After Redis comes back empty or older: put back what the archive knows, without a gap.

A stream whose last entry is older than what the archive stored from it (or that is gone)
lost data: Redis restarted without its AOF, or from an old backup. For each such stream the
manager

1. points each consumer group at the entry it starts after (a bot's group in its inbox: it
   is subscribed again, its inbox filled from the stream after its position once the
   events are written back, and the fanout's group starts after the last archived entry,
   so nothing written back is copied twice; see :mod:`bus.fanout`):

   - each bot's declared group at its own recorded position (``group_positions``, kept by
     :mod:`manager.archive.group_positions`: the group had acked every entry at or below it), so it
     is handed exactly what it had not handled, even when it was behind the archiver;
   - a declared group with no recorded position (never recorded: declared since the last
     round, or PostgreSQL was away) at the last archived entry, as before positions were
     kept; what it had not handled is skipped, and the log says so;
   - the archiver's group at the last archived entry, so nothing is stored twice;

2. writes the archived events back into the stream under their original entry ids, from
   the lowest of those positions or the start of the hot window, whichever is lower, up to
   the last archived entry (so the groups behind are delivered them, and replay and late
   readers find them again), and moves the stream's last id up to the last archived entry
   if nothing reached it, so the stream no longer looks lost;

then publishes ``system.redis.restored`` saying what it did. Groups first: a bot whose
group vanished recreates it at the start of the stream, and must not then read the events
it had acked as they are written back.

Positions trail the groups by up to one recording round, so a group may be handed again
what it acked just before the loss (at-least-once). A group far behind makes the write-back
as long as its backlog: Redis held that much before the loss (the trimmer keeps everything
above every group's floor, unless idle groups are released). Recorded groups the config no
longer declares are not recreated. Events that reached Redis but not the archive before the
loss are gone; the event says from which entry on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis

from bus.archive.store import ArchiveStore
from bus.entry_id import EntryId
from bus.fanout import Fanout
from bus.groups import ensure_group
from bus.keys import ARCHIVER_GROUP, FANOUT_GROUP, GROUP_PREFIX, Keys
from bus.wire import encode

log = structlog.get_logger("manager.archive.restore")
_PAGE = 1000


@dataclass
class Restored:
    """What a restore did, per stream key."""

    #: Events written back into each stream.
    events: dict[str, int] = field(default_factory=dict)
    #: The last archived entry of each stream (its archiver's group starts after it).
    positions: dict[str, str] = field(default_factory=dict)
    #: The entry each group of each stream now starts after: stream → group → entry id.
    groups: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Declared groups without a recorded position (they start at the last archived entry).
    unrecorded: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.positions)

    def describe_groups(self, name: Callable[[str], str]) -> str:
        """Where each group starts, for people: ``user: bot-group-a after 12-0, …; …``
        (``name`` turns a stream key into what to show)."""
        return "; ".join(
            f"{name(stream)}: "
            + ", ".join(
                f"{group} after {position}"
                + (" (no recorded position)" if group in self.unrecorded.get(stream, []) else "")
                for group, position in starts.items()
            )
            for stream, starts in self.groups.items()
        )


async def _last_id(redis: Redis, stream: str) -> str | None:
    """The stream's last generated id, None if the stream does not exist."""
    try:
        info: Any = await redis.xinfo_stream(stream)
    except Exception as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return str(info["last-generated-id"])


async def lost_streams(redis: Redis, store: ArchiveStore) -> dict[str, str]:
    """Streams Redis holds less of than the archive: stream key → last archived id."""
    lost = {}
    for stream, archived in (await store.positions()).items():
        last = await _last_id(redis, stream)
        if last is None or EntryId.parse(last) < EntryId.parse(archived):
            lost[stream] = archived
    return lost


async def restore(
    redis: Redis,
    store: ArchiveStore,
    keys: Keys,
    *,
    groups_for: Callable[[str], Iterable[str]],
    hot_window_ms: int,
    now_ms: int,
    fanout: Fanout | None = None,
) -> Restored:
    """Repair every stream that lost data (see the module); what was done.

    ``groups_for`` names the declared groups of a stream (the archiver's aside); their
    recorded positions are read from ``store``. With ``fanout`` (the manager's), the bots'
    groups are subscribed again, their inboxes filled from their positions, and the fanout
    group starts after the last archived entry; without, every group is pointed on the
    stream itself.
    """
    done = Restored()
    lost = await lost_streams(redis, store)
    recorded = await store.group_positions.load(lost) if lost else {}
    window_start = EntryId(max(0, now_ms - hot_window_ms), 0)
    for stream, archived in lost.items():
        starts, unrecorded = _starts(stream, archived, groups_for(stream), recorded)
        inboxed = {g: p for g, p in starts.items() if fanout and g.startswith(GROUP_PREFIX)}
        on_stream = {g: p for g, p in starts.items() if g not in inboxed}
        if fanout is not None:  # what is written back is copied by the subscriptions
            on_stream[FANOUT_GROUP] = archived
        await _point_groups(redis, stream, on_stream)  # first: see the module
        lowest = min([window_start, *map(EntryId.parse, starts.values())])
        done.events[stream] = await _write_back(redis, store, stream, archived, after=lowest)
        await _lift_last_id(redis, stream, archived)
        if fanout is not None:
            for group, position in inboxed.items():
                await fanout.unsubscribe(stream, group)
                await fanout.subscribe(stream, group, position)
        done.positions[stream] = archived
        done.groups[stream] = starts
        done.unrecorded[stream] = unrecorded
        log.warning(
            "Redis had lost this stream's data: restored from the archive",
            stream=stream,
            events_written_back=done.events[stream],
            written_back_after=str(lowest),
            last_archived=archived,
            groups_start_after=starts,
        )
    return done


def _starts(
    stream: str,
    archived: str,
    declared: Iterable[str],
    recorded: Mapping[tuple[str, str], tuple[int, int]],
) -> tuple[dict[str, str], list[str]]:
    """The entry each group starts after (group → id), and the declared groups that had no
    recorded position."""
    starts = {ARCHIVER_GROUP: archived}
    unrecorded = []
    for group in declared:
        position = recorded.get((stream, group))
        if position is None:
            unrecorded.append(group)
            starts[group] = archived
            log.warning(
                "no recorded position for this group: it starts after the last archived "
                "entry; what it had not handled before the loss is skipped",
                stream=stream,
                group=group,
                starts_after=archived,
            )
        else:
            starts[group] = str(EntryId(*position))
            log.info(
                "consumer group resumes after its recorded position",
                stream=stream,
                group=group,
                starts_after=starts[group],
            )
    return starts, unrecorded


async def _write_back(
    redis: Redis, store: ArchiveStore, stream: str, archived: str, *, after: EntryId
) -> int:
    """Write the archived events of ``stream`` above ``after`` up to ``archived`` back into
    it, under their entry ids; how many."""
    top = EntryId.parse(archived)
    last = await _last_id(redis, stream)
    if last is not None and EntryId.parse(last) >= after:
        after = EntryId.parse(last)  # XADD needs ids above the stream's last one
    written = 0
    while after < top:
        page = await store.entries(stream, after=str(after), limit=_PAGE)
        page = [event for event in page if EntryId.parse(str(event.entry_id)) <= top]
        if not page:
            break
        async with redis.pipeline(transaction=False) as pipe:
            for event in page:
                fields: Any = encode(event)
                pipe.xadd(stream, fields, id=str(event.entry_id))
            await pipe.execute()
        written += len(page)
        after = EntryId.parse(str(page[-1].entry_id))
    return written


async def _lift_last_id(redis: Redis, stream: str, archived: str) -> None:
    """Move the stream's last id up to ``archived`` if the write-back did not reach it (all
    of it older than what was written back), so the stream no longer looks lost."""
    last = await _last_id(redis, stream)
    if last is not None and EntryId.parse(last) < EntryId.parse(archived):
        # redis-py has no XSETID method; execute_command is untyped.
        await redis.execute_command("XSETID", stream, archived)  # type: ignore[no-untyped-call]


async def _point_groups(redis: Redis, stream: str, starts: Mapping[str, str]) -> None:
    """Create or move each group to start after its entry (group → id)."""
    for group, position in starts.items():
        await ensure_group(redis, stream, group, position, move=True)
