"""The bus metrics: counters and histograms of a process's traffic (bus.metrics)."""

from __future__ import annotations

from typing import Any

import pytest

from bus import BusClient, Event
from bus.metrics import (
    BUCKETS,
    MAX_CATEGORIES,
    BusMetrics,
    Histogram,
    empty_snapshot,
    entry_age,
    merge_snapshot,
)
from bus.settings import RetrySettings
from tests.conftest import BusFactory
from tests.support import running, wait_until

FAST_RETRY = RetrySettings(max_attempts=3, backoff_base=0.01, backoff_cap=0.02, jitter=0.0)


def counters(client: BusClient, kind: str, group: str) -> dict[str, int]:
    """One kind of counter of one group, by category."""
    found: dict[str, int] = client.metrics.snapshot()["counters"].get(kind, {}).get(group, {})
    return found


def histogram(client: BusClient, name: str, group: str) -> dict[str, Any]:
    """One histogram of one group ({} when nothing was observed)."""
    found: dict[str, Any] = client.metrics.snapshot()["histograms"].get(name, {}).get(group, {})
    return found


class TestHistogram:
    def test_observations_land_in_their_bucket(self) -> None:
        """A value goes to the first bucket whose bound is not below it; past the last, +Inf."""
        h = Histogram()
        for value in (0.0, 0.001, 0.0011, 0.3, 10.0, 11.0, -1.0):
            h.observe(value)
        assert h.counts[0] == 3  # 0, the bound itself, and the clamped negative
        assert h.counts[1] == 1  # 0.0011 <= 0.0025
        assert h.counts[BUCKETS.index(0.5)] == 1
        assert h.counts[BUCKETS.index(10.0)] == 1
        assert h.counts[-1] == 1  # +Inf
        assert h.count == 7 and sum(h.counts) == 7
        assert h.sum == pytest.approx(21.3021)

    def test_entry_age(self) -> None:
        """The age of an entry is now minus its id's milliseconds, never negative."""
        assert entry_age("1700000000000-5", 1700000000.25) == pytest.approx(0.25)
        assert entry_age("1700000001000-0", 1700000000.0) == 0.0
        assert entry_age("garbage", 1700000000.0) == 0.0


class TestCounting:
    def test_categories_are_first_segments_and_bounded(self) -> None:
        """Counts go by the type's first segment; "" is unknown; too many categories: other."""
        metrics = BusMetrics()
        group = metrics.group("g")
        group.retried("user.message.received")
        group.retried("user.profile.updated")
        group.dead_lettered("")
        for n in range(MAX_CATEGORIES + 5):
            group.retried(f"c{n}.x.y")
        retried = metrics.snapshot()["counters"]["retried"]["g"]
        assert retried["user"] == 2
        assert len(retried) == MAX_CATEGORIES  # user, 62 c<n> and other (unknown has none)
        assert retried["other"] == 7  # the 62 first c<n> fit beside user and unknown
        assert metrics.snapshot()["counters"]["dead_lettered"]["g"] == {"unknown": 1}

    def test_snapshot_leaves_zeros_out_and_is_json(self) -> None:
        """An unused client's snapshot is empty; one count shows only that count."""
        metrics = BusMetrics()
        assert metrics.snapshot() == empty_snapshot()
        metrics.published("user.x.y")
        assert metrics.snapshot() == {
            "counters": {"published": {"": {"user": 1}}},
            "histograms": {},
        }

    def test_acked_counts_and_observes_each_entry(self) -> None:
        """An ack flush counts each entry by its type and observes its age."""
        metrics = BusMetrics()
        group = metrics.group("g")
        group.acked(["user.a.b", "", "user.c.d"], ["1-0", "2-0", "3-0"])
        assert group.delay_ack.count == 3
        assert group.delay_ack.counts[-1] == 3  # entry ids of 1970: very late
        assert metrics.snapshot()["counters"]["acked"]["g"] == {"user": 2, "unknown": 1}


class TestMerge:
    def test_snapshots_add_up(self) -> None:
        """Counters and histogram buckets of several processes add up."""
        a, b = BusMetrics(), BusMetrics()
        for metrics in (a, b):
            metrics.published("user.x.y")
            metrics.group("bot-group-x").handled(0.002)
        b.published("system.x.y")
        total = empty_snapshot()
        merge_snapshot(total, a.snapshot())
        merge_snapshot(total, b.snapshot())
        assert total["counters"]["published"][""] == {"user": 2, "system": 1}
        handler = total["histograms"]["handler_duration"]["bot-group-x"]
        assert handler["count"] == 2 and handler["counts"][1] == 2
        assert handler["sum"] == pytest.approx(0.004)
        assert a.snapshot()["counters"]["published"][""] == {"user": 1}  # inputs untouched

    @pytest.mark.parametrize(
        "garbage",
        [
            {"counters": {"published": {"": {"user": -1}}}},
            {"counters": {"published": {"": {"user": True}}}},
            {"counters": {"invented": {"": {"user": 1}}}},
            {"counters": {"published": ["user", 1]}},
            {"counters": "x"},
            {"histograms": {"handler_duration": {"g": {"counts": [1], "sum": 0.1, "count": 1}}}},
            {"histograms": {"handler_duration": {"g": {"counts": [1] * 14, "sum": "x"}}}},
            {"histograms": {"nope": {"g": {}}}},
        ],
    )
    def test_malformed_parts_are_skipped(self, garbage: dict[str, Any]) -> None:
        """What does not have the snapshot's shape adds nothing and raises nothing."""
        total = empty_snapshot()
        merge_snapshot(total, garbage)
        assert not any(total["counters"].get(k, {}).get("", {}) for k in total["counters"])
        assert all(not groups for groups in total["histograms"].values())


@pytest.mark.redis
class TestHooks:
    async def test_published_consumed_and_acked_by_category(self, bus_factory: BusFactory) -> None:
        """Events of two categories are counted published by the producer, consumed and acked
        by the consumer's group, and each handled one is in every histogram."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        consumer.subscribe("user.#", _ok, name="users")
        consumer.subscribe("system.#", _ok, name="systems")
        async with running(consumer):
            for n in range(3):
                await producer.publish("user.chat.said", {"n": n})
            await producer.publish_many([("system.backup.completed", {})] * 2)
            await wait_until(lambda: sum(counters(consumer, "acked", "bot-group-a").values()) == 5)
        assert counters(producer, "published", "") == {"user": 3, "system": 2}
        assert counters(consumer, "consumed", "bot-group-a") == {"user": 3, "system": 2}
        assert counters(consumer, "acked", "bot-group-a") == {"user": 3, "system": 2}
        assert counters(consumer, "published", "") == {}
        for name in ("handler_duration", "delay_start", "delay_ack"):
            observed = histogram(consumer, name, "bot-group-a")
            assert observed["count"] == 5 and sum(observed["counts"]) == 5, name
        assert histogram(consumer, "delay_ack", "bot-group-a")["sum"] < 30

    async def test_a_failure_then_success_is_one_retry(self, bus_factory: BusFactory) -> None:
        """A handler that fails once is counted retried once, consumed and acked once, and
        both of its runs are in the duration histogram."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        calls = 0

        @consumer.subscribe("user.#", retry=FAST_RETRY)
        async def flaky(event: Event) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("downstream hiccup")

        async with running(consumer):
            await producer.publish("user.x.y", {})
            await wait_until(lambda: counters(consumer, "acked", "bot-group-a") == {"user": 1})
        assert counters(consumer, "retried", "bot-group-a") == {"user": 1}
        assert counters(consumer, "consumed", "bot-group-a") == {"user": 1}
        assert counters(consumer, "dead_lettered", "bot-group-a") == {}
        assert histogram(consumer, "handler_duration", "bot-group-a")["count"] == 2
        assert histogram(consumer, "delay_start", "bot-group-a")["count"] == 1

    async def test_a_handler_that_always_fails_is_dead_lettered(
        self, bus_factory: BusFactory
    ) -> None:
        """max_attempts runs, max_attempts - 1 retries, one dead letter, and the ack."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")

        @consumer.subscribe("user.#", retry=FAST_RETRY)
        async def broken(event: Event) -> None:
            raise ValueError("never")

        async with running(consumer):
            await producer.publish("user.x.y", {})
            await wait_until(lambda: counters(consumer, "acked", "bot-group-a") == {"user": 1})
        assert counters(consumer, "dead_lettered", "bot-group-a") == {"user": 1}
        assert counters(consumer, "retried", "bot-group-a") == {"user": 2}
        assert counters(consumer, "consumed", "bot-group-a") == {"user": 1}
        assert histogram(consumer, "handler_duration", "bot-group-a")["count"] == 3
        assert await consumer.dlq.count() == 1

    async def test_a_malformed_entry_is_unknown(self, bus_factory: BusFactory) -> None:
        """An entry that does not decode is dead-lettered and acked as category unknown,
        never consumed; a non-matching entry is acked without being counted."""
        consumer, producer = await bus_factory("a"), await bus_factory("p")
        consumer.subscribe("user.message.#", _ok)
        async with running(consumer):
            await consumer.redis.xadd(consumer.keys.stream("user"), {"hello": "world"})
            await producer.publish("user.other.thing", {})  # no subscription matches
            await wait_until(lambda: consumer.stats()["counters"].get("acked") == 2)
        assert counters(consumer, "dead_lettered", "bot-group-a") == {"unknown": 1}
        assert counters(consumer, "acked", "bot-group-a") == {"unknown": 1}
        assert counters(consumer, "consumed", "bot-group-a") == {}
        assert histogram(consumer, "delay_ack", "bot-group-a")["count"] == 1


async def _ok(event: Event) -> None:
    return None
