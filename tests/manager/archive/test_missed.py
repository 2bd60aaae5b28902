"""The missed-deliveries watch (multibot_deliveries_missed_total): an event a group should
have handled and did not is counted once for that group, after audit.missed_after and not
before; a handled one is not; a window is never counted twice; PostgreSQL away delays the
count and neither loses nor doubles it."""

from __future__ import annotations

from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus import Event
from bus.archive import ArchiveStore
from bus.archive.deliveries import DeliveryRow
from bus.groups import ensure_group
from bus.keys import ARCHIVER_GROUP
from manager.archive.caught_up import archive_caught_up
from manager.archive.link import ArchiveLink
from manager.archive.missed import MissedDeliveries
from manager.embedded.postgres_server import PostgresServer
from tests.manager.archive.archive_support import KEYS
from tests.support import in_background, wait_until

pytestmark = [pytest.mark.postgres]

AFTER = 1.0  # seconds: audit.missed_after
INTERVAL = 0.2  # seconds between rounds
DAVE = "bot-group-dave"
MISSED = "events missed a group: no outcome past the deadline"
AWAY = "cannot count the events that missed a group: PostgreSQL unavailable"
BACK = "can count the events that missed a group again"


def event(n: int, type_: str = "order.placed", at: datetime | None = None) -> Event:
    """An event as the archiver stores it (read from the bot stream at entry ``n``-0)."""
    return Event(
        type=type_,
        data={"n": n},
        source="shop",
        timestamp=at or datetime.now(UTC),
        stream=KEYS.stream("bot"),
        entry_id=f"{n}-0",
    )


async def handled(store: ArchiveStore, group: str, *events: Event) -> None:
    """``group``'s handled record of each event, as the copier stores it."""
    now = datetime.now(UTC)
    await store.deliveries.copy(
        [
            DeliveryRow(event_id=e.id, created_at=e.timestamp, group_name=group,
                        consumer=f"{group}-0", outcome="handled", attempts=1,
                        entry_id=e.entry_id or "", read_at=now, done_at=now, handler_ms=1.0)
            for e in events
        ]
    )  # fmt: skip


def said(logs: list[MutableMapping[str, Any]], message: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == message]


def checked_past(watch: MissedDeliveries, moment: datetime) -> bool:
    return watch.checked is not None and watch.checked > moment


class TestMissedDeliveries:
    async def test_an_event_nobody_handled_counts_once_for_its_group_after_the_deadline(
        self, archive: ArchiveStore, link: ArchiveLink
    ) -> None:
        """Alice and dave subscribe to orders; alice handles the order, dave records
        nothing: dave's group is counted once, no earlier than missed_after after the
        order, and logged with what to run; alice's and an event nobody subscribes to are
        not counted, and later rounds do not count it again."""
        for bot_id in ("alice", "dave"):
            await archive.upsert_subscriptions(bot_id, [("order.#", None)])
        watch = MissedDeliveries(link.get, AFTER, interval=INTERVAL)
        with capture_logs() as logs:
            async with in_background(watch.run()):
                order, note = event(1), event(2, "user.note.added")
                await archive.insert_events([order, note])
                await handled(archive, "bot-group-alice", order)
                await wait_until(lambda: bool(watch.totals()), 10, "dave's miss counted")
                counted_at = datetime.now(UTC)
                assert counted_at - order.timestamp >= timedelta(seconds=AFTER)
                assert watch.totals() == {DAVE: 1}
                await wait_until(lambda: checked_past(watch, counted_at), 10, "later rounds")
                assert watch.totals() == {DAVE: 1}
        (logged,) = said(logs, MISSED)
        assert logged["log_level"] == "warning"
        assert logged["group"] == DAVE and logged["events"] == 1
        assert "multibot events query --since " in logged["see"]
        assert "multibot events show ID" in logged["see"]

    async def test_postgres_away_delays_the_count_and_neither_loses_nor_doubles_it(
        self, archive: ArchiveStore, link: ArchiveLink, postgres_server: PostgresServer
    ) -> None:
        """PostgreSQL stops past the deadline of an order archived before and of orders
        published meanwhile: the window waits (one warning for the outage), and once
        PostgreSQL is back and the late orders are archived (after the watch reached it
        again), dave's two misses are counted once each, the order he handled is not."""
        await archive.upsert_subscriptions("dave", [("order.#", None)])
        watch = MissedDeliveries(link.get, AFTER, interval=INTERVAL)
        with capture_logs() as logs:
            async with in_background(watch.run()):
                await wait_until(lambda: watch.checked is not None, 10, "the first round")
                before = event(1)
                await archive.insert_events([before])
                await postgres_server.stop()
                during = datetime.now(UTC)
                await wait_until(lambda: bool(said(logs, AWAY)), 10, "the outage noticed")
                deadline = during + timedelta(seconds=AFTER + 3 * INTERVAL)
                await wait_until(lambda: datetime.now(UTC) > deadline, 10, "rounds failing")
                assert watch.checked is not None and watch.checked < during
                await postgres_server.start()
                await wait_until(lambda: bool(said(logs, BACK)), 10, "PostgreSQL reached again")
                # Published during the outage, archived after the watch is back: the
                # archiver has what waited in Redis to write, as long as the deadline.
                late, done = event(2, at=during), event(3, at=during)
                async with await ArchiveStore.connect(postgres_server.dsn, keys=KEYS) as store:
                    await store.insert_events([late, done])
                    await handled(store, DAVE, done)
                await wait_until(lambda: watch.totals().get(DAVE, 0) >= 2, 20, "both counted")
                counted_at = datetime.now(UTC)
                await wait_until(lambda: checked_past(watch, counted_at), 10, "later rounds")
                assert watch.totals() == {DAVE: 2}
        assert len(said(logs, AWAY)) == 1
        assert sum(entry["events"] for entry in said(logs, MISSED)) == 2

    async def test_a_long_gap_is_caught_up_in_steps(
        self, archive: ArchiveStore, link: ArchiveLink
    ) -> None:
        """A window holds at most ``most`` seconds of events: rounds catch up step by step,
        and an order is counted in the one round whose window holds it."""
        await archive.upsert_subscriptions("dave", [("order.#", None)])
        watch = MissedDeliveries(link.get, AFTER, most=0.25)
        assert await watch.check() == {}  # starts at missed_after ago
        start = watch.checked
        assert start is not None
        order = event(1)
        await archive.insert_events([order])
        await wait_until(
            lambda: datetime.now(UTC) > order.timestamp + timedelta(seconds=AFTER + 1),
            10,
            "the order past its deadline, and a second more",
        )
        rounds: list[dict[str, int]] = []
        for _ in range(50):  # about 8 rounds of a quarter second catch up the 2 s
            since = watch.checked
            rounds.append(await watch.check())
            assert watch.checked is not None and since is not None
            assert timedelta(0) < watch.checked - since <= timedelta(seconds=0.25)
            if checked_past(watch, order.timestamp + timedelta(seconds=0.5)):
                break
        assert len(rounds) >= 4
        assert [r for r in rounds if r] == [{DAVE: 1}]
        assert watch.totals() == {DAVE: 1}


class TestCaughtUp:
    @pytest.mark.redis
    async def test_the_archiver_and_the_copy_behind_hold_the_count(self, admin: Redis) -> None:
        """An event entry not yet read by the archiver, then read and not yet stored, holds
        a window that reaches it; acked, it does not. A delivery record waiting in Redis
        longer than the copy's slack holds it too; a young one does not."""
        stream = KEYS.stream("bot")
        now = datetime.now(UTC)
        old_ms = int((now - timedelta(seconds=30)).timestamp() * 1000)
        await admin.xadd(stream, {"n": "1"}, id=f"{old_ms}-0")
        await ensure_group(admin, stream, ARCHIVER_GROUP, "0")
        assert "not read yet" in await archive_caught_up(admin, KEYS, now, now)
        before = now - timedelta(seconds=60)
        assert await archive_caught_up(admin, KEYS, before, now) == ""
        await admin.xreadgroup(ARCHIVER_GROUP, "a", {stream: ">"})
        assert "not yet stored" in await archive_caught_up(admin, KEYS, now, now)
        await admin.xack(stream, ARCHIVER_GROUP, f"{old_ms}-0")
        assert await archive_caught_up(admin, KEYS, now, now) == ""
        await admin.xadd(KEYS.deliveries(), {"records": "[]"}, id=f"{old_ms}-0")
        assert "copy" in await archive_caught_up(admin, KEYS, now, now)
        await admin.delete(KEYS.deliveries())
        await admin.xadd(KEYS.deliveries(), {"records": "[]"})
        assert await archive_caught_up(admin, KEYS, now, now) == ""

    async def test_a_window_waits_for_the_archive_and_is_then_counted_once(
        self, archive: ArchiveStore, link: ArchiveLink
    ) -> None:
        """While the archive says it is behind, nothing is counted and the window stays;
        once it has caught up, dave's missed order is counted, once."""
        await archive.upsert_subscriptions("dave", [("order.#", None)])
        behind = ["the archiver on bot: entries not read yet"]

        async def caught_up(until: datetime, now: datetime) -> str:
            return behind[0]

        watch = MissedDeliveries(link.get, AFTER, interval=INTERVAL, caught_up=caught_up)
        async with in_background(watch.run()):
            order = event(1)
            await archive.insert_events([order])
            await wait_until(lambda: watch.checked is not None, 10, "the first round")
            start = watch.checked
            await wait_until(
                lambda: datetime.now(UTC) - timedelta(seconds=AFTER) > order.timestamp
                + timedelta(seconds=2 * INTERVAL), 10, "the deadline passed",
            )  # fmt: skip
            assert watch.checked == start and watch.totals() == {}
            behind[0] = ""
            await wait_until(lambda: checked_past(watch, order.timestamp), 10, "the window")
        assert watch.totals() == {DAVE: 1}
