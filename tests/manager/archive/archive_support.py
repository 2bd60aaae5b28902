"""What the archiver's tests share: an archiver on the test's Redis and PostgreSQL, events
to publish, and what the archiver group and the archive hold.

The fixtures they share (``admin``, ``archive``, ``link``, ``superuser``) are in
``tests/manager/conftest.py``.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no type hints
from redis.asyncio import Redis

from bus import BusClient, Event
from bus.archive import ArchiveStore
from bus.keys import ARCHIVER_GROUP, Keys
from manager.archive.archiver import Archiver
from manager.archive.link import ArchiveLink
from manager.config import ArchiveSettings
from manager.observe.lag import stream_keys
from tests.support import entries, in_background

KEYS = Keys()
#: Types over the user, bot and system streams (the default routes).
#: None has a schema in bus.catalog, so any data goes.
TYPES = (
    "user.note.added",
    "user.profile.edited",
    "bot.task.done",
    "bot.reply.sent",
    "system.health.checked",
)


#: How long the tests' archivers hold a stream's last events for a full block: the hold
#: itself is tested in test_archiver_filling; elsewhere a second per wait adds up.
TEST_FILL_WAIT = 0.05


def make_archiver(admin: Redis, link: ArchiveLink, **settings: Any) -> Archiver:
    """An archiver of the default namespace, with default settings but ``settings`` (and
    a short ``fill_wait`` unless given)."""
    settings.setdefault("fill_wait", TEST_FILL_WAIT)
    return Archiver(admin, KEYS, ArchiveSettings(**settings), link.get)


def archiving(archiver: Archiver) -> AbstractAsyncContextManager[asyncio.Task[None]]:
    """Run the archiver while the block runs; cancel it after (raising what killed it)."""
    return in_background(archiver.run())


def drafts(bus: BusClient, n: int, start: int = 0) -> list[Event]:
    """``n`` events over the user, bot and system streams, some with every optional field."""
    chain = str(uuid.uuid4())
    return [
        bus.event(
            TYPES[i % len(TYPES)],
            {"n": i, "text": f"héllo {i}", "nested": {"items": [i, None, True, 1.5]}},
            key=f"key-{i % 7}" if i % 3 else None,
            correlation_id=chain if i % 2 else None,
            causation_id=str(uuid.uuid4()) if i % 4 == 1 else None,
        )
        for i in range(start, start + n)
    ]


async def publish(bus: BusClient, n: int, start: int = 0) -> list[Event]:
    """Publish ``n`` events with one ``publish_many``; the events (confirmed by Redis)."""
    events = drafts(bus, n, start)
    assert await bus.publish_many(events) == [e.id for e in events]
    return events


async def archived(
    store: ArchiveStore, at_least: int, alive: Callable[[], None] | None = None
) -> bool:
    """Whether ``at_least`` events are archived; ``alive`` raises if the archiver died."""
    if alive is not None:
        alive()
    return await store.count() >= at_least


def running(task: asyncio.Task[None]) -> Callable[[], None]:
    """A check that fails the test at once if the in-process archiver stopped."""

    def check() -> None:
        if task.done():
            raise AssertionError(f"the archiver stopped: {task.exception()!r}")

    return check


async def positions(redis: Redis) -> dict[str, tuple[str, str]]:
    """Event id → (stream key, entry id) of every entry in the namespace's streams."""
    found: dict[str, tuple[str, str]] = {}
    for stream in await stream_keys(redis, KEYS):
        for entry_id, fields in await entries(redis, stream):
            found.setdefault(fields.get("id", ""), (stream, entry_id))
    return found


async def id_counts(dsn: str) -> collections.Counter[str]:
    """How many rows each event id has in ``events``."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch("SELECT id FROM event_index")
    finally:
        await conn.close()
    return collections.Counter(str(row["id"]) for row in rows)


async def archiver_groups(redis: Redis) -> list[tuple[str, dict[str, Any]]]:
    """(stream, XINFO GROUPS row) of the archiver group on every stream it archives."""
    found = []
    for stream in [*await stream_keys(redis, KEYS), KEYS.dead_letters()]:
        groups: Any = await redis.xinfo_groups(stream)
        found += [(stream, dict(g)) for g in groups if g["name"] == ARCHIVER_GROUP]
    return found


async def backlog(redis: Redis) -> tuple[int, int]:
    """(pending, unread) entries of the archiver group, summed over its streams."""
    pending = unread = 0
    for stream, group in await archiver_groups(redis):
        pending += int(group["pending"])
        after: Any = await redis.xrange(stream, f"({group['last-delivered-id']}", "+")
        unread += len(after)
    return pending, unread


async def caught_up(redis: Redis) -> bool:
    """Whether the archiver group has read and acked every entry of every stream."""
    return await backlog(redis) == (0, 0)


async def pending_ids(redis: Redis) -> dict[str, list[str]]:
    """The entry ids pending in the archiver group, per stream."""
    held: dict[str, list[str]] = {}
    for stream, _ in await archiver_groups(redis):
        rows: Any = await redis.xpending_range(stream, ARCHIVER_GROUP, "-", "+", 10_000)
        held[stream] = [str(row["message_id"]) for row in rows]
    return held
