"""The trimmer: streams cut to the hot window, never below an unarchived or unacked entry.

Against a private Redis (7.0 and 6.2). Groups are driven with plain XREADGROUP and XACK, as
the archiver and the bots do; time is given to ``trim_all(now_ms=…)``, never slept out.
Every test asserts the exact entries left, so a trimmer cutting one entry too many fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from bus import BusClient, Event, EventType
from bus.entry_id import EntryId
from bus.fanout import Fanout, subscribers
from bus.keys import ARCHIVER_GROUP, Keys
from bus.wire import decode, encode
from manager.announcer import Announcer
from manager.archive.removed_groups import RemovedGroups
from manager.archive.trimmer import Trimmer, trim_point
from manager.config import ArchiveSettings
from tests.conftest import BusFactory
from tests.support import entries, in_background, wait_until

pytestmark = pytest.mark.redis

KEYS = Keys()
STREAM = KEYS.stream("user")
BOT_GROUP = "bot-group-worker"


@pytest.fixture
async def bus(bus_factory: BusFactory) -> BusClient:
    """The manager's bus client: publishes the events and the announcements."""
    return await bus_factory("manager")


@pytest.fixture
async def announcer(bus: BusClient) -> AsyncIterator[Announcer]:
    """An announcer publishing in the background for the whole test."""
    announcements = Announcer(bus)
    async with in_background(announcements.run()):
        yield announcements


def make_trimmer(bus: BusClient, announcer: Announcer, **settings: Any) -> Trimmer:
    """A trimmer of the default namespace with a zero hot window unless ``settings`` say."""
    archive = ArchiveSettings(**{"hot_window": 0, **settings})
    return Trimmer(bus.redis, KEYS, archive, announcer)


async def publish(bus: BusClient, n: int) -> list[str]:
    """Publish ``n`` events to the user stream; their entry ids."""
    await bus.publish_many([("user.note.added", {"n": i}) for i in range(n)])
    return await left(bus.redis)


async def left(redis: Redis, stream: str = STREAM) -> list[str]:
    """The entry ids still in a stream."""
    return [entry_id for entry_id, _ in await entries(redis, stream)]


async def join(redis: Redis, group: str, start: str = "0", stream: str = STREAM) -> None:
    """Create a consumer group on the stream, reading from after ``start``."""
    await redis.xgroup_create(stream, group, id=start)


async def read(redis: Redis, group: str, count: int, stream: str = STREAM) -> list[str]:
    """Deliver up to ``count`` new entries to consumer ``c`` of ``group``; their ids."""
    reply: Any = await redis.xreadgroup(group, "c", {stream: ">"}, count=count)
    return [entry_id for _, rows in reply for entry_id, _ in rows]


async def ack(redis: Redis, group: str, ids: list[str], stream: str = STREAM) -> None:
    """XACK these entries in ``group``."""
    await redis.xack(stream, group, *ids)


async def archived(redis: Redis, n: int = 10_000, stream: str = STREAM) -> list[str]:
    """Have the archiver group read and ack up to ``n`` entries (joining it if needed)."""
    groups: Any = await redis.xinfo_groups(stream)
    if not any(g["name"] == ARCHIVER_GROUP for g in groups):
        await join(redis, ARCHIVER_GROUP, stream=stream)
    ids = await read(redis, ARCHIVER_GROUP, n, stream)
    if ids:
        await ack(redis, ARCHIVER_GROUP, ids, stream)
    return ids


def after(ids: list[str], seconds: float = 1.0) -> int:
    """A time (ms) ``seconds`` after the last of ``ids``: older than the hot window."""
    return EntryId.parse(ids[-1])[0] + int(seconds * 1000)


async def idle_longer_than(redis: Redis, group: str, ms: int) -> bool:
    """Whether every consumer of ``group`` on the stream has been idle over ``ms``."""
    consumers: Any = await redis.xinfo_consumers(STREAM, group)
    return bool(consumers) and all(int(c["idle"]) > ms for c in consumers)


async def idle_reports(redis: Redis) -> list[Event]:
    """The ``system.group.idle`` events on the system stream."""
    stream = KEYS.stream("system")
    found = [decode(fields, stream, entry_id) for entry_id, fields in await entries(redis, stream)]
    return [e for e in found if e.type == EventType.GROUP_IDLE]


class TestTrimPoint:
    def test_lowest_group_floor_is_the_point(self) -> None:
        """The point is the lowest floor of every group when the cutoff is above it."""
        assert trim_point([(5, 0), (3, 2), (4, 9)], (9, 0)) == (3, 2)

    def test_cutoff_is_the_point_when_lower(self) -> None:
        """Entries inside the hot window stay even when every group is past them."""
        assert trim_point([(5, 0), (7, 1)], (4, 0)) == (4, 0)

    def test_no_group_means_no_point(self) -> None:
        """Without a group to vouch for the entries nothing may be trimmed."""
        assert trim_point([], (9, 0)) is None


class TestSafeFloor:
    async def test_stream_without_the_archiver_group_is_never_trimmed(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """A stream no archiver has joined keeps every entry, even when every bot group
        acked them all and they are far older than the hot window."""
        ids = await publish(bus, 5)
        await join(bus.redis, BOT_GROUP)
        await ack(bus.redis, BOT_GROUP, await read(bus.redis, BOT_GROUP, 10))
        trimmer = make_trimmer(bus, announcer)
        assert await trimmer.trim_all(now_ms=after(ids, 3600)) == 0
        assert await left(bus.redis) == ids
        assert trimmer.trimmed == {}

    async def test_entries_the_archiver_has_not_read_are_kept(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """Entries the archiver group has not read yet stay; those it acked go."""
        ids = await publish(bus, 5)
        await join(bus.redis, ARCHIVER_GROUP)
        trimmer = make_trimmer(bus, announcer)
        assert await trimmer.trim_all(now_ms=after(ids)) == 0
        assert await left(bus.redis) == ids
        assert await archived(bus.redis, 2) == ids[:2]
        assert await trimmer.trim_all(now_ms=after(ids)) == 2
        assert await left(bus.redis) == ids[2:]
        assert trimmer.trimmed == {STREAM: 2}

    async def test_entry_pending_in_the_archiver_group_holds_every_later_one(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """An entry the archiver read but has not acked (its batch not committed) stays,
        with every entry after it even when those are acked; its ack releases them."""
        ids = await publish(bus, 6)
        await join(bus.redis, ARCHIVER_GROUP)
        assert await read(bus.redis, ARCHIVER_GROUP, 10) == ids
        await ack(bus.redis, ARCHIVER_GROUP, [*ids[:2], *ids[3:]])
        trimmer = make_trimmer(bus, announcer)
        assert await trimmer.trim_all(now_ms=after(ids)) == 2
        assert await left(bus.redis) == ids[2:]
        assert await trimmer.trim_all(now_ms=after(ids)) == 0
        await ack(bus.redis, ARCHIVER_GROUP, [ids[2]])
        assert await trimmer.trim_all(now_ms=after(ids)) == 4
        assert await left(bus.redis) == []

    async def test_entries_a_bot_group_has_not_acked_or_read_are_kept(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """Archived entries stay while a bot group still holds them pending or has not
        read them; the lowest such entry of any group is where trimming stops."""
        ids = await publish(bus, 6)
        await join(bus.redis, BOT_GROUP)
        await join(bus.redis, "bot-group-late", start=ids[3])  # has read up to ids[3]
        assert await archived(bus.redis) == ids
        assert await read(bus.redis, BOT_GROUP, 10) == ids
        await ack(bus.redis, BOT_GROUP, [ids[0], ids[1], ids[5]])
        trimmer = make_trimmer(bus, announcer)
        assert await trimmer.trim_all(now_ms=after(ids)) == 2
        assert await left(bus.redis) == ids[2:]  # ids[2] pending in bot-group-worker
        await ack(bus.redis, BOT_GROUP, ids[2:5])
        assert await trimmer.trim_all(now_ms=after(ids)) == 2
        assert await left(bus.redis) == ids[4:]  # ids[4] unread by bot-group-late

    async def test_only_entries_older_than_the_hot_window_go_once_every_group_acked(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """With every group done, entries older than the hot window are trimmed and the
        younger ones kept, at the millisecond."""
        base = 1_700_000_000_000
        ids = [f"{base + k * 10_000}-0" for k in range(6)]  # one entry every 10 s
        for entry_id in ids:
            fields = encode(Event(type="user.note.added", data={}, source="greeter"))
            await bus.redis.xadd(STREAM, fields, id=entry_id)  # type: ignore[arg-type]
        await join(bus.redis, BOT_GROUP)
        await ack(bus.redis, BOT_GROUP, await read(bus.redis, BOT_GROUP, 10))
        assert await archived(bus.redis) == ids
        trimmer = make_trimmer(bus, announcer, hot_window=60)
        assert await trimmer.trim_all(now_ms=base + 60_000 + 20_000) == 2
        assert await left(bus.redis) == ids[2:]  # ids[2] is exactly 60 s old: kept
        assert await trimmer.trim_all(now_ms=base + 60_000 + 20_001) == 1
        assert await left(bus.redis) == ids[3:]
        assert await trimmer.trim_all(now_ms=base + 60_000 + 20_001) == 0
        assert trimmer.trimmed == {STREAM: 3}

    async def test_over_the_memory_limit_everything_safe_goes_whatever_its_age(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """hot_window_max_memory: past it, archived and acked entries go even if young;
        what a group has not acked stays."""
        ids = await publish(bus, 6)
        await join(bus.redis, BOT_GROUP)
        await ack(bus.redis, BOT_GROUP, (await read(bus.redis, BOT_GROUP, 10))[:4])
        assert await archived(bus.redis) == ids
        roomy = make_trimmer(bus, announcer, hot_window=3600)
        assert await roomy.trim_all() == 0  # young, and memory is fine
        tight = make_trimmer(bus, announcer, hot_window=3600, hot_window_max_memory=1)
        assert await tight.trim_all() == 4
        assert await left(bus.redis) == ids[4:]  # the bot has not acked these yet


class TestIdleGroups:
    async def _idle_bot_group(self, bus: BusClient) -> list[str]:
        """Six archived entries; the bot group took two, acked one and then went idle."""
        ids = await publish(bus, 6)
        assert await archived(bus.redis) == ids
        await join(bus.redis, BOT_GROUP)
        assert await read(bus.redis, BOT_GROUP, 2) == ids[:2]
        await ack(bus.redis, BOT_GROUP, ids[:1])
        await wait_until(lambda: idle_longer_than(bus.redis, BOT_GROUP, 100), what="idle")
        return ids

    async def test_pinned_idle_group_is_reported_once_and_still_holds_the_floor(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """A lagging group idle past idle_group_after is announced once as
        system.group.idle over several rounds, and with "pin" its entries stay."""
        ids = await self._idle_bot_group(bus)
        trimmer = make_trimmer(bus, announcer, idle_group_after=0.05, idle_groups="pin")
        for _ in range(3):
            await trimmer.trim_all(now_ms=after(ids))
            assert await left(bus.redis) == ids[1:]
        assert await announcer.flush(5)
        (report,) = await idle_reports(bus.redis)
        assert report.source == "manager"
        data = dict(report.data)
        assert data.pop("idle_seconds") >= 0.1
        assert data.pop("lag") in (4, None)  # Redis 6.2 does not report lag
        assert data == {"group": BOT_GROUP, "stream": "user", "released": False}

    async def test_released_idle_group_no_longer_holds_the_floor(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """With "release" an idle group is announced once as released and its pending and
        unread entries are trimmed down to the archiver's floor."""
        ids = await self._idle_bot_group(bus)
        trimmer = make_trimmer(bus, announcer, idle_group_after=0.05, idle_groups="release")
        assert await trimmer.trim_all(now_ms=after(ids)) == 6
        assert await left(bus.redis) == []
        more = await publish(bus, 2)
        assert await archived(bus.redis, 1) == more[:1]
        await trimmer.trim_all(now_ms=after(more))
        assert await left(bus.redis) == more[1:]  # the archiver's floor still holds
        assert await announcer.flush(5)
        (report,) = await idle_reports(bus.redis)
        assert report.data["released"] is True and report.data["group"] == BOT_GROUP

    async def test_group_nobody_ever_read_counts_as_idle_from_when_it_was_first_seen(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """A group without consumers holds the floor when first seen and is released only
        once idle_group_after has passed since then."""
        ids = await publish(bus, 3)
        assert await archived(bus.redis) == ids
        await join(bus.redis, BOT_GROUP)
        trimmer = make_trimmer(bus, announcer, idle_group_after=0.2, idle_groups="release")
        assert await trimmer.trim_all(now_ms=after(ids)) == 0
        assert await left(bus.redis) == ids

        async def released() -> bool:
            await trimmer.trim_all(now_ms=after(ids))
            return await left(bus.redis) == []

        await wait_until(released, timeout=5, what="the unread group released")
        assert await announcer.flush(5)
        assert len(await idle_reports(bus.redis)) == 1

    async def test_idle_group_that_is_caught_up_is_not_reported(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """A group whose consumers are idle but that acked everything is not reported."""
        ids = await publish(bus, 3)
        assert await archived(bus.redis) == ids
        await join(bus.redis, BOT_GROUP)
        await ack(bus.redis, BOT_GROUP, await read(bus.redis, BOT_GROUP, 10))
        await wait_until(lambda: idle_longer_than(bus.redis, BOT_GROUP, 100), what="idle")
        trimmer = make_trimmer(bus, announcer, idle_group_after=0.05)
        assert await trimmer.trim_all(now_ms=after(ids)) == 3
        assert await announcer.flush(5)
        assert await idle_reports(bus.redis) == []


async def system_events(redis: Redis, type_: str) -> list[Event]:
    """The events of one type on the system stream."""
    stream = KEYS.stream("system")
    found = [decode(fields, stream, entry_id) for entry_id, fields in await entries(redis, stream)]
    return [e for e in found if e.type == type_]


async def group_names(redis: Redis, stream: str = STREAM) -> set[str]:
    """The consumer groups on a stream."""
    groups: Any = await redis.xinfo_groups(stream)
    return {str(g["name"]) for g in groups}


class TestRemovedBots:
    async def test_group_of_a_removed_bot_is_destroyed_after_the_grace_period(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """A group of a bot the config no longer names holds the floor during the grace
        period; then it is destroyed, announced once, and the stream is trimmed past it.
        A configured bot's group and groups not named like a bot's are left alone."""
        ids = await publish(bus, 4)
        assert await archived(bus.redis) == ids
        for group in ("bot-group-gone", "bot-group-kept", "reporting-tool"):
            await join(bus.redis, group, start=ids[0] if group != "bot-group-gone" else "0")
        trimmer = make_trimmer(bus, announcer, removed_group_grace=0.3)
        trimmer.removed.configure(["kept"])
        await trimmer.trim_all(now_ms=after(ids))
        assert await left(bus.redis) == ids  # the removed bot's group still holds
        assert trimmer.holders[STREAM].group == "bot-group-gone"

        async def destroyed() -> bool:
            await trimmer.trim_all(now_ms=after(ids))
            return "bot-group-gone" not in await group_names(bus.redis)

        await wait_until(destroyed, timeout=5, what="the removed bot's group destroyed")
        assert await group_names(bus.redis) == {ARCHIVER_GROUP, "bot-group-kept", "reporting-tool"}
        assert await left(bus.redis) == ids[1:]  # the kept groups' floor now
        assert await announcer.flush(5)
        (report,) = await system_events(bus.redis, EventType.GROUP_REMOVED)
        assert report.data["group"] == "bot-group-gone"
        assert report.data["stream"] == "user"
        assert report.data["absent_seconds"] >= 0.3

    async def test_bot_back_within_the_grace_period_keeps_its_group(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """A bot removed and put back before the grace period ends keeps its group and
        position; nothing is destroyed before the bots are known."""
        ids = await publish(bus, 2)
        assert await archived(bus.redis) == ids
        await join(bus.redis, "bot-group-back")
        trimmer = make_trimmer(bus, announcer)
        clock = [0.0]
        trimmer.removed = RemovedGroups(bus.redis, KEYS, announcer, 10, clock=lambda: clock[0])
        await trimmer.trim_all(now_ms=after(ids))  # bots not configured yet: hands off
        trimmer.removed.configure([])
        await trimmer.trim_all(now_ms=after(ids))
        trimmer.removed.configure(["back"])
        clock[0] = 11.0  # past the grace period
        await trimmer.trim_all(now_ms=after(ids))
        assert "bot-group-back" in await group_names(bus.redis)
        assert await left(bus.redis) == ids


class TestInboxes:
    async def test_an_inbox_keeps_what_its_group_did_not_ack_the_stream_what_was_not_copied(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """Whatever the hot window, an inbox is cut to its group's floor; the stream keeps
        the hot window and everything the fanout has not copied yet."""
        redis = bus.redis
        fanout = Fanout(redis, KEYS, lambda: [STREAM])
        await fanout.subscribe(STREAM, BOT_GROUP, "0")
        ids = await publish(bus, 4)
        assert await archived(redis) == ids
        await fanout.pump(STREAM)
        inbox = KEYS.inbox(BOT_GROUP, STREAM)
        assert await read(redis, BOT_GROUP, 2, inbox) == ids[:2]
        await ack(redis, BOT_GROUP, ids[:1], inbox)
        trimmer = make_trimmer(bus, announcer, hot_window=3600)
        await trimmer.trim_all(now_ms=after(ids))
        assert await left(redis, inbox) == ids[1:]  # the pending one and the unread
        assert await left(redis) == ids  # the hot window keeps the stream's
        more = await bus.publish_many([("user.note.added", {"n": 9})])
        assert await archived(redis) == [await _id_of(redis, more[0])]
        await make_trimmer(bus, announcer).trim_all(now_ms=after(ids, 3600))
        assert await left(redis) == [await _id_of(redis, more[0])]  # not copied yet: kept

    async def test_a_removed_bots_subscription_goes_after_the_grace_period(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """The inbox of a bot the config no longer names is unsubscribed and deleted."""
        redis = bus.redis
        fanout = Fanout(redis, KEYS, lambda: [STREAM])
        await fanout.subscribe(STREAM, "bot-group-gone", "0")
        await fanout.subscribe(STREAM, "bot-group-kept", "0")
        ids = await publish(bus, 2)
        await fanout.pump(STREAM)
        trimmer = make_trimmer(bus, announcer, removed_group_grace=0.2)
        trimmer.removed.configure(["kept"])

        async def gone() -> bool:
            await trimmer.trim_all(now_ms=after(ids))
            return await subscribers(redis, KEYS, STREAM) == ["bot-group-kept"]

        await wait_until(gone, timeout=5, what="the removed bot's inbox unsubscribed")
        assert await redis.exists(KEYS.inbox("bot-group-gone", STREAM)) == 0
        assert await left(redis, KEYS.inbox("bot-group-kept", STREAM)) == ids


async def _id_of(redis: Redis, event_id: str) -> str:
    """The entry id of the event ``event_id`` on the user stream."""
    for entry_id, fields in await entries(redis, STREAM):
        if fields.get("id") == event_id:
            return entry_id
    raise AssertionError(f"no entry of event {event_id}")


class TestDeadLetterRetention:
    async def test_old_letters_go_only_once_archived(
        self, bus: BusClient, announcer: Announcer
    ) -> None:
        """Dead letters older than dlq_retention are trimmed, but never one the archiver
        has not stored; younger ones stay."""
        dlq = KEYS.dead_letters()
        ids = [await bus.redis.xadd(dlq, {"reason": "error", "n": str(i)}) for i in range(4)]
        letters = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        await join(bus.redis, ARCHIVER_GROUP, stream=dlq)
        trimmer = make_trimmer(bus, announcer, dlq_retention=60)
        assert await trimmer.trim_all(now_ms=after(letters, 3600)) == 0  # none archived
        assert await left(bus.redis, dlq) == letters
        stored = await read(bus.redis, ARCHIVER_GROUP, 2, stream=dlq)
        await ack(bus.redis, ARCHIVER_GROUP, stored, stream=dlq)
        assert await trimmer.trim_all(now_ms=after(letters, 30)) == 0  # young enough
        assert await trimmer.trim_all(now_ms=after(letters, 3600)) == 2
        assert await left(bus.redis, dlq) == letters[2:]
