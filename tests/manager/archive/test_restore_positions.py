"""Restore without a gap: each group resumes after its own recorded position.

Against a private Redis and PostgreSQL. The history is made by hand: 100 events published
to the user stream and stored in the archive, the archiver's group past all of them, one
bot group that acked only the first 10 and one that acked all 100. What a group is handed
after the restore is read by a real bus consumer, up to a marker published after it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import BusClient, Event
from bus.archive import ArchiveStore
from bus.archive.errors import ArchiveUnavailableError
from bus.archive.group_positions import clamp
from bus.entry_id import EntryId
from bus.fanout import Fanout
from bus.keys import ARCHIVER_GROUP, FANOUT_GROUP, Keys, group_name
from bus.wire import decode
from manager.archive.group_positions import PositionRecorder, acked_position
from manager.archive.link import ArchiveLink
from manager.archive.restore import Restored, lost_streams, restore
from manager.embedded.postgres_server import PostgresServer
from manager.embedded.redis_server import RedisServer
from tests.conftest import BusFactory
from tests.support import entries, in_background, running, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

KEYS = Keys()
STREAM = KEYS.stream("user")
BEHIND, CAUGHT_UP = group_name("behind"), group_name("caught-up")
HOUR_MS = 3_600_000


@dataclass
class History:
    """What happened before the loss."""

    #: Event ids, in stream order.
    events: list[str]
    #: Their entry ids.
    entries: list[str]


async def read(redis: Redis, group: str, count: int) -> list[str]:
    """Deliver up to ``count`` new entries of the user stream to ``group``; their ids."""
    reply: Any = await redis.xreadgroup(group, "c", {STREAM: ">"}, count=count)
    return [entry_id for _, rows in reply for entry_id, _ in rows]


async def handle(redis: Redis, group: str, count: int) -> list[str]:
    """Read and ack ``count`` entries in ``group`` (creating it at the start)."""
    groups: Any = await redis.xinfo_groups(STREAM)
    if group not in {g["name"] for g in groups}:
        await redis.xgroup_create(STREAM, group, id="0")
    ids = await read(redis, group, count)
    if ids:
        await redis.xack(STREAM, group, *ids)
    return ids


def stored(store: ArchiveStore) -> Callable[[], Awaitable[ArchiveStore]]:
    """``store`` the way the recorder asks for it."""

    async def get() -> ArchiveStore:
        return store

    return get


async def restore_declared(
    redis: Redis,
    store: ArchiveStore,
    *groups: str,
    hot_window_ms: int = HOUR_MS,
    now_ms: int | None = None,
) -> Restored:
    """``restore`` for a config declaring ``groups`` on the user stream, at ``now_ms``
    (else now)."""
    return await restore(
        redis,
        store,
        KEYS,
        groups_for=lambda stream: list(groups) if stream == STREAM else [],
        hot_window_ms=hot_window_ms,
        now_ms=int(time.time() * 1000) if now_ms is None else now_ms,
    )


@pytest.fixture
async def history(bus_factory: BusFactory, redis: Redis, store: ArchiveStore) -> History:
    """100 events archived; BEHIND acked the first 10, CAUGHT_UP all of them."""
    producer = await bus_factory("producer")
    events = await producer.publish_many([("user.note.added", {"n": n}) for n in range(100)])
    rows = await entries(redis, STREAM)
    await store.insert_events([decode(fields, STREAM, entry_id) for entry_id, fields in rows])
    ids = [entry_id for entry_id, _ in rows]
    await redis.xgroup_create(STREAM, ARCHIVER_GROUP, id=ids[-1])
    assert await handle(redis, BEHIND, 10) == ids[:10]
    assert await handle(redis, CAUGHT_UP, 100) == ids
    assert await store.last_archived(STREAM) == ids[-1]
    return History(events, ids)


async def done_with_stream(redis: Redis, bots: tuple[str, ...]) -> bool:
    """Whether every bot's group was delivered the whole stream and acked all of it."""
    info: Any = await redis.xinfo_stream(STREAM)
    groups: Any = await redis.xinfo_groups(STREAM)
    finished = {
        g["name"]
        for g in groups
        if g["last-delivered-id"] == info["last-generated-id"] and int(g["pending"]) == 0
    }
    return {group_name(bot) for bot in bots} <= finished


async def handed(
    redis: Redis, bus_factory: BusFactory, producer: BusClient, *bots: str
) -> dict[str, list[str]]:
    """Run a consumer of each bot until it handled everything up to a marker published
    now; the event ids each handled (in the order handled), without the marker."""
    seen: dict[str, list[str]] = {bot: [] for bot in bots}
    clients = []
    for bot in bots:
        client = await bus_factory(bot)

        async def note(event: Event, bot: str = bot) -> None:
            seen[bot].append(event.id)

        client.subscribe("user.#", note)
        clients.append(client)
    async with running(*clients):
        marker = await producer.publish("user.note.added", {"marker": True})
        await wait_until(lambda: done_with_stream(redis, bots), 20, "every bot at the marker")
    for ids in seen.values():
        ids.remove(marker)
    return seen


class TestRestoreWithoutAGap:
    async def test_group_behind_the_archiver_is_handed_exactly_what_it_had_not_acked(
        self, history: History, redis: Redis, store: ArchiveStore, bus_factory: BusFactory
    ) -> None:
        """Redis emptied: the group that acked 10 of 100 archived events is handed 11..100
        (not 1..10, not nothing), the caught-up group nothing again."""
        await PositionRecorder(redis, KEYS, stored(store), 1.0).record()
        await redis.flushall()
        done = await restore_declared(redis, store, BEHIND, CAUGHT_UP)
        producer = await bus_factory("producer")
        seen = await handed(redis, bus_factory, producer, "behind", "caught-up")
        # Without an ordering key events may be handled out of order; each once, though.
        assert sorted(seen["behind"]) == sorted(history.events[10:])
        assert seen["caught-up"] == []
        assert done.events == {STREAM: 100}  # the hot window holds them all
        assert done.groups == {
            STREAM: {
                ARCHIVER_GROUP: history.entries[-1],
                BEHIND: history.entries[9],
                CAUGHT_UP: history.entries[-1],
            }
        }
        assert done.unrecorded == {STREAM: []}

    async def test_only_what_a_group_misses_is_written_back_beyond_the_hot_window(
        self, history: History, redis: Redis, store: ArchiveStore
    ) -> None:
        """With every event older than the hot window, the stream gets back exactly the
        events after the lowest position, and no longer looks lost."""
        await PositionRecorder(redis, KEYS, stored(store), 1.0).record()
        await redis.flushall()
        later = EntryId.parse(history.entries[-1])[0] + HOUR_MS
        done = await restore_declared(
            redis, store, BEHIND, CAUGHT_UP, hot_window_ms=1000, now_ms=later
        )
        assert done.events == {STREAM: 90}
        assert [entry_id for entry_id, _ in await entries(redis, STREAM)] == history.entries[10:]
        assert await lost_streams(redis, store) == {}
        assert await read(redis, BEHIND, 1000) == history.entries[10:]
        assert await read(redis, CAUGHT_UP, 1000) == []

    async def test_redis_from_an_old_backup_resumes_each_group_at_its_position(
        self, history: History, redis: Redis, store: ArchiveStore
    ) -> None:
        """Redis back with the first 50 entries and older groups: each group resumes after
        its recorded position, the entries past the backup written back."""
        await PositionRecorder(redis, KEYS, stored(store), 1.0).record()
        rows = await entries(redis, STREAM)
        await redis.delete(STREAM)  # the old backup: half the entries, groups further back
        for entry_id, fields in rows[:50]:
            await redis.xadd(STREAM, fields, id=entry_id)  # type: ignore[arg-type]
        for group in (ARCHIVER_GROUP, BEHIND, CAUGHT_UP):
            await redis.xgroup_create(STREAM, group, id=history.entries[4])
        done = await restore_declared(redis, store, BEHIND, CAUGHT_UP)
        assert done.events == {STREAM: 50}
        assert [entry_id for entry_id, _ in await entries(redis, STREAM)] == history.entries
        assert await read(redis, BEHIND, 1000) == history.entries[10:]
        assert await read(redis, CAUGHT_UP, 1000) == []
        assert await read(redis, ARCHIVER_GROUP, 1000) == []

    async def test_a_group_without_a_recorded_position_starts_after_the_archive(
        self, history: History, redis: Redis, store: ArchiveStore
    ) -> None:
        """A declared group never recorded starts after the last archived entry, as before
        positions were kept, and the log says so; a recorded group no longer declared is
        not recreated."""
        await PositionRecorder(redis, KEYS, stored(store), 1.0).record()
        newcomer = group_name("newcomer")
        await redis.flushall()
        with capture_logs() as logs:
            done = await restore_declared(redis, store, CAUGHT_UP, newcomer)
        assert done.unrecorded == {STREAM: [newcomer]}
        assert done.groups[STREAM][newcomer] == history.entries[-1]
        assert "(no recorded position)" in done.describe_groups(KEYS.stream_name)
        said = [e for e in logs if e.get("group") == newcomer]
        assert [(e["log_level"], e["stream"]) for e in said] == [("warning", STREAM)]
        assert "no recorded position" in said[0]["event"]
        assert await read(redis, newcomer, 1000) == []
        groups: Any = await redis.xinfo_groups(STREAM)
        assert {g["name"] for g in groups} == {ARCHIVER_GROUP, CAUGHT_UP, newcomer}


class TestPositionRecorder:
    def test_a_position_is_the_floor_minus_one(self) -> None:
        """Below the oldest pending entry, else the last delivered one."""
        assert acked_position((20, 0), None) == (20, 0)
        assert acked_position((20, 0), (15, 3)) == (15, 2)
        assert acked_position((20, 0), (15, 0)) == (14, 2**64 - 1)
        assert acked_position((20, 0), (20, 0)) == (19, 2**64 - 1)
        assert EntryId(0, 0).previous() == (0, 0)

    async def test_records_each_bot_group_below_its_oldest_pending_entry(
        self, history: History, redis: Redis, store: ArchiveStore
    ) -> None:
        """A group with an entry pending is recorded just below it; the archiver's group
        is not recorded."""
        taken = await read(redis, BEHIND, 10)  # entries 11..20 delivered
        await redis.xack(STREAM, BEHIND, *taken[:3], *taken[4:])  # the 14th stays pending
        await PositionRecorder(redis, KEYS, stored(store), 1.0).record()
        recorded = await store.group_positions.load()
        below_pending = clamp(EntryId.parse(history.entries[13]).previous())
        assert recorded == {
            (STREAM, BEHIND): below_pending,
            (STREAM, CAUGHT_UP): EntryId.parse(history.entries[-1]),
        }
        assert (
            EntryId.parse(history.entries[12]) <= below_pending < EntryId.parse(history.entries[13])
        )

    async def test_a_group_in_its_inbox_is_recorded_under_the_stream(
        self, history: History, redis: Redis, store: ArchiveStore
    ) -> None:
        """Under the manager a bot's group reads its inbox (same entry ids): its position
        is recorded under the stream, the fanout's group is not."""
        fanout = Fanout(redis, KEYS, lambda: [STREAM])
        inboxed = group_name("inboxed")
        await fanout.subscribe(STREAM, inboxed, history.entries[49])
        inbox = KEYS.inbox(inboxed, STREAM)
        reply: Any = await redis.xreadgroup(inboxed, "c", {inbox: ">"}, count=5)
        taken = [entry_id for _, rows in reply for entry_id, _ in rows]
        await redis.xack(inbox, inboxed, *taken)
        await PositionRecorder(redis, KEYS, stored(store), 1.0).record()
        recorded = await store.group_positions.load()
        assert recorded[(STREAM, inboxed)] == EntryId.parse(history.entries[54])
        assert (STREAM, FANOUT_GROUP) not in recorded

    async def test_positions_never_move_backwards_across_an_empty_redis(
        self, history: History, redis: Redis, store: ArchiveStore
    ) -> None:
        """Redis emptied and the groups recreated at its start by their bots: the stream is
        not recorded until it is restored, then the good positions are still there."""
        recorder = PositionRecorder(redis, KEYS, stored(store), 1.0)
        await recorder.record()
        good = await store.group_positions.load()
        await redis.flushall()
        await redis.xgroup_create(STREAM, BEHIND, id="0", mkstream=True)  # a bot's regroup
        await redis.xgroup_create(STREAM, CAUGHT_UP, id="$")  # the coordinator's
        with capture_logs() as logs:
            assert await recorder.record() == {}
            assert await recorder.record() == {}
        assert await store.group_positions.load() == good
        skipped = [e for e in logs if e.get("stream") == STREAM]
        assert [e["log_level"] for e in skipped] == ["warning"]  # once, not every round
        assert await store.group_positions.record({(STREAM, BEHIND): (0, 0)}) == 0
        await restore_declared(redis, store, BEHIND, CAUGHT_UP)
        assert await recorder.record() == good
        await handle(redis, BEHIND, 5)
        await recorder.record()
        moved = await store.group_positions.load()
        assert moved[(STREAM, BEHIND)] == EntryId.parse(history.entries[14])

    async def test_survives_redis_being_down(
        self, history: History, redis: Redis, redis_server: RedisServer, store: ArchiveStore
    ) -> None:
        """Redis stopped: the recorder says so once and keeps going; once Redis is back it
        records again."""
        recorder = PositionRecorder(redis, KEYS, stored(store), 0.05)
        with capture_logs() as logs:
            async with in_background(recorder.run()) as task:
                await take_down(redis_server, "Redis", recorder, logs, 10)
                assert not task.done()
                await redis_server.start()
                await handle(redis, BEHIND, 5)
                await wait_until(
                    lambda: at(store, BEHIND, history.entries[14]), 10, "recording after Redis"
                )
                assert not task.done()
        assert said(logs, "recording group positions again")

    async def test_survives_postgres_being_down(
        self, history: History, redis: Redis, postgres_server: PostgresServer
    ) -> None:
        """PostgreSQL stopped: the recorder says so once and keeps going; once PostgreSQL
        is back it records what the groups did meanwhile."""
        link = ArchiveLink(postgres_server.dsn, KEYS)
        recorder = PositionRecorder(redis, KEYS, link.get, 0.05)
        try:
            with capture_logs() as logs:
                async with in_background(recorder.run()) as task:
                    await take_down(postgres_server, "PostgreSQL", recorder, logs, 20)
                    await handle(redis, BEHIND, 5)
                    assert not task.done()
                    await postgres_server.start()
                    store = await link.get()
                    await wait_until(
                        lambda: at(store, BEHIND, history.entries[14]), 20, "recording after"
                    )
                    assert not task.done()
            warned = [e for e in logs if e.get("log_level") == "warning"]
            assert len(warned) == 1  # once per outage, not every round
        finally:
            await link.close()


async def take_down(
    server: RedisServer | PostgresServer,
    name: str,
    recorder: PositionRecorder,
    logs: Sequence[Mapping[str, Any]],
    within: float,
) -> None:
    """Once ``recorder`` has recorded both groups, stop ``server`` (``name``: Redis or
    PostgreSQL) and wait ``within`` seconds for the recorder to log that it cannot reach it."""
    await wait_until(lambda: recorder.recorded == 2, 10, "the first positions")
    await server.stop()
    await wait_until(
        lambda: said(logs, f"cannot record group positions: {name} unavailable"),
        within,
        f"the recorder to notice {name} is down",
    )


def said(logs: Sequence[Mapping[str, Any]], event: str) -> bool:
    """Whether ``event`` was logged."""
    return any(e["event"] == event for e in logs)


async def at(store: ArchiveStore, group: str, entry_id: str) -> bool:
    """Whether ``group``'s recorded position on the user stream is ``entry_id``."""
    try:
        recorded = await store.group_positions.load([STREAM])
    except ArchiveUnavailableError:
        return False
    return recorded.get((STREAM, group)) == EntryId.parse(entry_id)
