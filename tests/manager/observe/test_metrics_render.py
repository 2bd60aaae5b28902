"""The Prometheus exposition (manager.observe.metrics): names, labels, values, and Redis reads."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from redis.asyncio import Redis

from bus.keys import ARCHIVER_GROUP, Keys
from bus.metrics import BusMetrics, empty_snapshot, merge_snapshot
from bus.outbox import outbox_backlog
from manager.observe.fleet_metrics import FleetMetrics
from manager.observe.metrics import (
    CONTENT_TYPE,
    METRIC_NAMES,
    MetricsInput,
    archive_lag,
    gather_streams,
    render,
)
from manager.status import (
    ArchiveStatus,
    BotStatus,
    GroupStatus,
    MemoryStatus,
    RedisMemoryStatus,
)

GROUP = "bot-group-greeter"


def fleet_snapshot() -> dict[str, object]:
    """Two processes' worth of bus metrics, added up as the manager does."""
    bot, manager = BusMetrics(), BusMetrics()
    group = bot.group(GROUP)
    for n in range(3):
        bot.published("user.message.sent")
        group.consumed("user.message.received", f"{1_700_000_000_000 + n}-0")
        group.handled(0.003)
    group.retried("user.message.received")
    group.dead_lettered("")
    group.acked(["user.message.received"] * 3 + [""], ["1-0", "2-0", "3-0", "4-0"])
    manager.published("bot.lifecycle.started")
    manager.published("system.shutdown.requested")
    total = empty_snapshot()
    merge_snapshot(total, bot.snapshot())
    merge_snapshot(total, manager.snapshot())
    return total


def realistic(**changes: object) -> MetricsInput:
    """A MetricsInput shaped like what the running manager's parts report."""
    fields: dict[str, Any] = {
        "fleet": fleet_snapshot(),
        "bots": [
            {
                "id": "greeter",
                "state": "running",
                "restarts": 2,
                "replicas": 2,
                "standby": False,
                "instances": [
                    {
                        "instance": 0,
                        "pid": 4242,
                        "state": "running",
                        "rss": 50_000_000,
                        "restarts": 2,
                        "uptime": 3.0,
                        "heartbeat_age": 0.1,
                        "role": None,
                        "last_exit": "exit 1",
                    },
                    {
                        "instance": 1,
                        "pid": None,
                        "state": "backoff",
                        "rss": None,
                        "restarts": 0,
                        "uptime": None,
                        "heartbeat_age": None,
                        "role": None,
                        "last_exit": None,
                    },
                ],
            },
            {
                "id": "broken",
                "state": "failed",
                "restarts": 5,
                "replicas": 1,
                "standby": False,
                "instances": [
                    {"instance": 0, "pid": None, "state": "failed", "rss": None, "restarts": 5}
                ],
            },
        ],
        "redis_memory": {
            "used": 160_000_000,
            "maxmemory": 1 << 30,
            "policy": "noeviction",
            "backpressure": True,
        },
        "memory": {
            "budget": 2 << 30,
            "used": 300_000_000,
            "manager": 90_000_000,
            "bots": 50_000_000,
            "redis": 160_000_000,
        },
        "groups": [
            {
                "stream": "user",
                "group": GROUP,
                "lag": 4,
                "lag_capped": False,
                "pending": 1,
                "consumers": 2,
            },
            {
                "stream": "user",
                "group": ARCHIVER_GROUP,
                "lag": None,
                "lag_capped": False,
                "pending": 0,
                "consumers": 1,
            },
        ],
        "streams": [
            {"stream": "user", "length": 1234, "memory_bytes": 65536},
            {"stream": "bot", "length": 7, "memory_bytes": None},
        ],
        "archive": {
            "healthy": True,
            "last_error": None,
            "archived": 1200,
            "dead_letters": 1,
            "batches": 30,
            "skipped": 0,
            "unarchivable": 0,
        },
        "archive_lag": {"user": 34, "bot": 0},
        "dead_letters": 3,
        "api_requests": {
            ("GET", "/v1/events/{event_id}", "200"): 5,
            ("POST", "/v1/events", "401"): 1,
        },
    }
    fields.update(changes)
    return typed(fields)


def typed(fields: dict[str, Any]) -> MetricsInput:
    """A MetricsInput from its JSON form (the parts' status models, as dictionaries)."""
    archive, memory, pressure = fields["archive"], fields["memory"], fields["redis_memory"]
    models = {
        "bots": [BotStatus.model_validate(b) for b in fields["bots"]],
        "groups": [GroupStatus.model_validate(g) for g in fields["groups"]],
        "archive": archive and ArchiveStatus.model_validate(archive),
        "memory": memory and MemoryStatus.model_validate(memory),
        "redis_memory": pressure and RedisMemoryStatus.model_validate(pressure),
    }
    return MetricsInput(**fields | models)


def samples(text: bytes) -> dict[str, list[Sample]]:
    """Samples by family name, parsed back with prometheus_client's parser."""
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def value(found: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` with exactly ``labels``."""
    family = name.removesuffix("_total")
    for base in ("_bucket", "_sum", "_count"):
        family = family.removesuffix(base) if family not in found else family
    (match,) = [s.value for s in found[family] if s.name == name and s.labels == labels]
    return match


class TestRender:
    def test_every_family_of_the_spec_is_rendered(self) -> None:
        """The families are exactly METRIC_NAMES, with the spec's names and types."""
        text = render(realistic())
        families = {f.name: f.type for f in text_string_to_metric_families(text.decode())}
        assert set(families) == METRIC_NAMES
        spec = Path(__file__).resolve().parents[4] / "spec" / "metrics-names.md"
        if spec.exists():  # the contract, when the checkout sits beside it
            named = {
                line.split()[1].split("{")[0]
                for line in spec.read_text().splitlines()
                if line.startswith("- multibot_")
            }
            assert {n.removesuffix("_total") for n in named} == METRIC_NAMES
        assert families["multibot_events_published"] == "counter"
        assert families["multibot_handler_duration_seconds"] == "histogram"
        assert families["multibot_consumer_lag"] == "gauge"

    def test_suffixes(self) -> None:
        """Counters end with _total; byte and second units are in the names."""
        text = render(realistic()).decode()
        types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
        for name, kind in types.items():
            if kind == "counter":
                assert name.endswith("_total"), name
            else:
                assert not name.endswith("_total"), name
        assert all(n.endswith("_seconds") for n, k in types.items() if k == "histogram")
        sizes = [n for n in types if "memory" in n or "rss" in n]
        assert len(sizes) == 6 and all(n.endswith("_bytes") for n in sizes), sizes

    def test_event_counters(self) -> None:
        """Event counters carry category (and group), summed over the processes."""
        found = samples(render(realistic()))
        assert value(found, "multibot_events_published_total", category="user") == 3
        assert value(found, "multibot_events_published_total", category="bot") == 1
        assert value(found, "multibot_events_published_total", category="system") == 1
        assert value(found, "multibot_events_consumed_total", group=GROUP, category="user") == 3
        assert value(found, "multibot_events_acked_total", group=GROUP, category="user") == 3
        assert value(found, "multibot_events_acked_total", group=GROUP, category="unknown") == 1
        assert value(found, "multibot_events_retried_total", group=GROUP, category="user") == 1
        dead = value(found, "multibot_events_dead_lettered_total", group=GROUP, category="unknown")
        assert dead == 1

    def test_histograms_are_cumulative(self) -> None:
        """Buckets are cumulative up to +Inf = count; both delay stages are there."""
        found = samples(render(realistic()))
        name = "multibot_handler_duration_seconds"
        buckets = [s for s in found[name] if s.name == name + "_bucket"]
        assert [s.labels["le"] for s in buckets][:3] == ["0.001", "0.0025", "0.005"]
        assert buckets[-1].labels == {"group": GROUP, "le": "+Inf"}
        assert [s.value for s in buckets] == sorted(s.value for s in buckets)
        assert value(found, name + "_bucket", group=GROUP, le="0.0025") == 0
        assert value(found, name + "_bucket", group=GROUP, le="0.005") == 3
        assert value(found, name + "_count", group=GROUP) == 3
        assert value(found, name + "_sum", group=GROUP) == pytest.approx(0.009)
        delay = "multibot_delivery_delay_seconds"
        assert value(found, delay + "_count", group=GROUP, stage="start") == 3
        assert value(found, delay + "_count", group=GROUP, stage="ack") == 4
        assert value(found, delay + "_bucket", group=GROUP, stage="ack", le="10.0") == 0

    def test_gauges(self) -> None:
        """Groups, streams, archive, bots and memory are reported with their labels."""
        found = samples(render(realistic()))
        assert value(found, "multibot_consumer_lag", stream="user", group=GROUP) == 4
        assert value(found, "multibot_consumer_pending", stream="user", group=GROUP) == 1
        consumers = value(found, "multibot_consumer_group_consumers", stream="user", group=GROUP)
        assert consumers == 2
        assert [s.labels["group"] for s in found["multibot_consumer_lag"]] == [GROUP]  # None
        assert value(found, "multibot_stream_length", stream="user") == 1234
        assert value(found, "multibot_stream_memory_bytes", stream="user") == 65536
        assert len(found["multibot_stream_memory_bytes"]) == 1
        assert value(found, "multibot_archive_lag", stream="user") == 34
        assert value(found, "multibot_archive_up") == 1
        assert value(found, "multibot_events_archived_total") == 1200
        assert value(found, "multibot_dead_letters") == 3
        assert value(found, "multibot_bot_up", bot="greeter", replica="0") == 1
        assert value(found, "multibot_bot_up", bot="greeter", replica="1") == 0
        assert value(found, "multibot_bot_up", bot="broken", replica="0") == 0
        assert value(found, "multibot_bot_failed", bot="broken") == 1
        assert value(found, "multibot_bot_failed", bot="greeter") == 0
        assert value(found, "multibot_bot_restarts_total", bot="broken") == 5
        assert value(found, "multibot_bot_rss_bytes", bot="greeter", replica="0") == 5e7
        assert len(found["multibot_bot_rss_bytes"]) == 1
        assert value(found, "multibot_memory_used_bytes", part="redis") == 160_000_000
        assert value(found, "multibot_memory_used_bytes", part="bots") == 50_000_000
        assert value(found, "multibot_memory_budget_bytes") == 2 << 30
        assert value(found, "multibot_redis_memory_bytes") == 160_000_000
        assert value(found, "multibot_redis_maxmemory_bytes") == 1 << 30
        assert value(found, "multibot_backpressure") == 1
        assert value(found, "multibot_manager_up") == 1
        api = "multibot_api_requests_total"
        assert value(found, api, method="GET", route="/v1/events/{event_id}", code="200") == 5

    def test_missed_deliveries(self) -> None:
        """Events that missed a group are a counter per group, 0 for a group with none yet
        (so that its first shows as an increase)."""
        found = samples(render(realistic(missed={GROUP: 2, "bot-group-quiet": 0})))
        assert value(found, "multibot_deliveries_missed_total", group=GROUP) == 2
        assert value(found, "multibot_deliveries_missed_total", group="bot-group-quiet") == 0
        assert samples(render(realistic()))["multibot_deliveries_missed"] == []

    def test_nothing_to_report(self) -> None:
        """With nothing measured and no archive, every family is there, most empty."""
        empty = MetricsInput(
            fleet=FleetMetrics().snapshot(),
            bots=[],
            memory=None,
            groups=[],
            redis_memory=None,
            streams=[],
            archive=None,
            archive_lag={},
            dead_letters=0,
            api_requests={},
        )
        found = samples(render(empty))
        assert set(found) == METRIC_NAMES
        assert found["multibot_archive_up"] == [] and found["multibot_events_published"] == []
        assert value(found, "multibot_manager_up") == 1

    def test_archive_down(self) -> None:
        """A failing archiver reads as archive_up 0."""
        archive = {"healthy": False, "last_error": "ConnectionRefusedError", "archived": 5}
        found = samples(render(realistic(archive=archive, archive_lag={})))
        assert value(found, "multibot_archive_up") == 0
        assert found["multibot_archive_lag"] == []

    def test_content_type(self) -> None:
        """The content type is the text format 0.0.4."""
        assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"

    @pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
    async def test_promtool_accepts_it(self, tmp_path: Path) -> None:
        """promtool check metrics finds nothing to complain about."""
        process = await asyncio.create_subprocess_exec(
            "promtool",
            "check",
            "metrics",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate(render(realistic()))
        assert process.returncode == 0, output.decode()
        assert output.decode().strip() == ""


@pytest.mark.redis
class TestRedisReads:
    async def test_gather_streams(self, redis: Redis) -> None:
        """Every stream of the namespace with its length and memory; others are not read."""
        keys = Keys("ns")
        for n in range(3):
            await redis.xadd(keys.stream("user"), {"n": str(n)})
        await redis.xadd(keys.stream("bot"), {"n": "0"})
        await redis.xadd(Keys("other").stream("user"), {"n": "0"})
        await redis.set("ns:stream:not-a-stream", "x")
        found = await gather_streams(redis, keys)
        assert [(s["stream"], s["length"]) for s in found] == [("bot", 1), ("user", 3)]
        assert all(isinstance(s["memory_bytes"], int) and s["memory_bytes"] > 0 for s in found)
        assert await gather_streams(redis, Keys("empty")) == []

    async def test_outbox_backlog(self, redis: Redis) -> None:
        """Entries waiting in each bot's outbox; none for a bot that published nothing, and
        an outbox a bot turned into a string is left out, not an error."""
        keys = Keys("ns")
        for n in range(3):
            await redis.xadd(keys.outbox("greeter"), {"n": str(n)})
        await redis.set(keys.outbox("broken"), "x")
        found = await outbox_backlog(redis, keys, ["greeter", "idle", "broken"])
        assert found == {"greeter": 3, "idle": 0}
        assert await outbox_backlog(redis, keys, []) == {}
        text = render(dataclasses.replace(realistic(), outboxes=found))
        assert value(samples(text), "multibot_outbox_entries", bot="greeter") == 3

    async def test_archive_lag(self, redis: Redis) -> None:
        """The archiver group's unread plus pending entries per stream (also on Redis 6.2,
        which reports no lag); other groups do not count."""
        keys = Keys("ns")
        user, dlq = keys.stream("user"), keys.dead_letters()
        for n in range(5):
            await redis.xadd(user, {"n": str(n)})
        await redis.xadd(dlq, {"n": "0"})
        await redis.xgroup_create(user, ARCHIVER_GROUP, id="0")
        await redis.xgroup_create(user, GROUP, id="$")
        await redis.xgroup_create(dlq, ARCHIVER_GROUP, id="$")
        await redis.xreadgroup(ARCHIVER_GROUP, "archiver-0", {user: ">"}, count=2)
        assert await archive_lag(redis, keys) == {"user": 5, "dlq": 0}  # 3 unread + 2 pending
        taken: Any = await redis.xreadgroup(ARCHIVER_GROUP, "archiver-0", {user: ">"})
        await redis.xack(user, ARCHIVER_GROUP, *[entry_id for entry_id, _ in taken[0][1]])
        assert await archive_lag(redis, keys) == {"user": 2, "dlq": 0}  # the first 2 pending
