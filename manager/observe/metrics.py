"""The manager's Prometheus exposition (GET /metrics): the names of spec/metrics-names.md.

:func:`render` turns one :class:`MetricsInput`, what the manager measured, into the text
format (0.0.4) with prometheus_client, through a registry made for that one call: nothing
is kept between scrapes and nothing is global. Event counters come from the fleet's bus
metrics (manager.observe.fleet_metrics), cumulative across bot restarts. :func:`gather_streams`
and :func:`archive_lag` read what the metrics need from Redis.

Every family is always present, without samples when there is nothing to report (a gauge
whose value is unknown is left out rather than reported as 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from bus.keys import ARCHIVER_GROUP, Keys
from bus.metrics import BUCKETS
from manager.observe.lag import DEFAULT_CAP, group_lags, stream_keys
from manager.status import (
    UP_STATES,
    ArchiveStatus,
    BotStatus,
    GroupStatus,
    InstanceState,
    MemoryStatus,
    RedisMemoryStatus,
)

#: The content type of :func:`render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Label value of the dead-letter stream in ``multibot_archive_lag``.
DEAD_LETTER_STREAM = "dlq"
#: ``le`` label values, written as prometheus_client writes its own histograms' ("0.25", "1.0").
_LE = [*(repr(float(b)) for b in BUCKETS), "+Inf"]

_EVENT_COUNTERS = {
    "published": ("multibot_events_published", "Events published (bots, API, manager)."),
    "consumed": ("multibot_events_consumed", "Deliveries handed to handlers."),
    "acked": ("multibot_events_acked", "Entries acked after handling."),
    "retried": ("multibot_events_retried", "Handler failures that will be retried."),
    "dead_lettered": (
        "multibot_events_dead_lettered",
        "Entries sent to the dead-letter stream.",
    ),
}
_MEMORY_PARTS = ("redis", "manager", "bots")

#: Every family :func:`render` writes, named as prometheus_client names families (a
#: counter without ``_total``, a histogram without ``_bucket``/``_sum``/``_count``).
METRIC_NAMES = frozenset(
    {
        *(name for name, _ in _EVENT_COUNTERS.values()),
        "multibot_events_archived",
        "multibot_bot_restarts",
        "multibot_api_requests",
        "multibot_handler_duration_seconds",
        "multibot_delivery_delay_seconds",
        "multibot_consumer_lag",
        "multibot_consumer_pending",
        "multibot_consumer_group_consumers",
        "multibot_stream_length",
        "multibot_stream_memory_bytes",
        "multibot_archive_lag",
        "multibot_archive_up",
        "multibot_dead_letters",
        "multibot_outbox_entries",
        "multibot_deliveries_missed",
        "multibot_bot_up",
        "multibot_bot_failed",
        "multibot_bot_rss_bytes",
        "multibot_memory_used_bytes",
        "multibot_memory_budget_bytes",
        "multibot_redis_memory_bytes",
        "multibot_redis_maxmemory_bytes",
        "multibot_backpressure",
        "multibot_manager_up",
    }
)


@dataclass(frozen=True)
class MetricsInput:
    """Everything one scrape reports, as the manager's parts describe themselves."""

    #: :meth:`manager.observe.fleet_metrics.FleetMetrics.snapshot`: event counters and histograms.
    fleet: Mapping[str, Any]
    #: The supervisor's: bots, their instances, states, RSS.
    bots: Sequence[BotStatus]
    #: The coordinator's, as of its last check (None before it).
    memory: MemoryStatus | None
    #: The coordinator's: each group's lag, pending and consumers.
    groups: Sequence[GroupStatus]
    #: The pressure watch's: Redis against its maxmemory (None without one).
    redis_memory: RedisMemoryStatus | None
    #: :func:`gather_streams`.
    streams: Sequence[Mapping[str, Any]]
    #: The archiver's health and counts, or None when the manager runs without an archive.
    archive: ArchiveStatus | None
    #: :func:`archive_lag`: entries not yet archived, by stream.
    archive_lag: Mapping[str, int]
    #: Entries in the dead-letter stream.
    dead_letters: int
    #: HTTP API requests: (method, route template, status code) → count.
    api_requests: Mapping[tuple[str, str, str], int]
    #: :func:`bus.outbox.outbox_backlog`: entries each bot published, not relayed yet.
    outboxes: Mapping[str, int] = field(default_factory=dict)
    #: :class:`manager.archive.missed.MissedDeliveries`' totals, per group (0 for each
    #: group known to have none yet, so that the first one shows as an increase).
    missed: Mapping[str, int] = field(default_factory=dict)


def render(data: MetricsInput) -> bytes:
    """The Prometheus text exposition of ``data``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data))
    return generate_latest(registry)


class _Snapshot(Collector):
    """Yields the families of one :class:`MetricsInput`."""

    def __init__(self, data: MetricsInput) -> None:
        self._data = data

    def collect(self) -> Iterator[Metric]:
        data = self._data
        yield from _event_counters(data.fleet)
        yield from _histograms(data.fleet)
        yield from _consumer_groups(data.groups)
        yield from _streams(data.streams)
        yield from _archive(data.archive, data.archive_lag)
        yield _gauge(
            "multibot_dead_letters", "Entries in the dead-letter stream.", data.dead_letters
        )
        yield from _bots(data.bots)
        outbox = GaugeMetricFamily(
            "multibot_outbox_entries",
            "Events (and dead letters) a bot published that the manager has not relayed to "
            "their stream yet.",
            labels=["bot"],
        )
        for bot, entries in sorted(data.outboxes.items()):
            outbox.add_metric([bot], entries)
        yield outbox
        missed = CounterMetricFamily(
            "multibot_deliveries_missed",
            "Events a group should have received and had no outcome for audit.missed_after "
            "seconds on (counted by the coordinating manager).",
            labels=["group"],
        )
        for group, count in sorted(data.missed.items()):
            missed.add_metric([group], count)
        yield missed
        yield from _memory(data.memory)
        yield from _pressure(data.redis_memory)
        requests = CounterMetricFamily(
            "multibot_api_requests",
            "HTTP API requests by method, route template and status code.",
            labels=["method", "route", "code"],
        )
        for (method, route, code), count in sorted(data.api_requests.items()):
            requests.add_metric([method, route, str(code)], count)
        yield requests
        yield _gauge("multibot_manager_up", "Always 1 while the manager answers.", 1)


def _gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    """A gauge without labels; no sample when ``value`` is None."""
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def _event_counters(fleet: Mapping[str, Any]) -> Iterator[Metric]:
    counters = fleet.get("counters") or {}
    for kind, (name, documentation) in _EVENT_COUNTERS.items():
        by_group: Mapping[str, Mapping[str, int]] = counters.get(kind) or {}
        if kind == "published":  # one label: the publishing groups ("") add up
            family = CounterMetricFamily(name, documentation, labels=["category"])
            totals: dict[str, int] = {}
            for categories in by_group.values():
                for category, count in categories.items():
                    totals[category] = totals.get(category, 0) + count
            for category, count in sorted(totals.items()):
                family.add_metric([category], count)
        else:
            family = CounterMetricFamily(name, documentation, labels=["group", "category"])
            for group, categories in sorted(by_group.items()):
                for category, count in sorted(categories.items()):
                    family.add_metric([group, category], count)
        yield family


def _histograms(fleet: Mapping[str, Any]) -> Iterator[Metric]:
    histograms = fleet.get("histograms") or {}
    duration = HistogramMetricFamily(
        "multibot_handler_duration_seconds", "Handler run time.", labels=["group"]
    )
    for group, histogram in sorted((histograms.get("handler_duration") or {}).items()):
        duration.add_metric([group], *_buckets(histogram))
    yield duration
    delay = HistogramMetricFamily(
        "multibot_delivery_delay_seconds",
        "Delay from the stream entry id's time to the handler's start (stage=start) and to "
        "the ack (stage=ack).",
        labels=["group", "stage"],
    )
    for stage, name in (("start", "delay_start"), ("ack", "delay_ack")):
        for group, histogram in sorted((histograms.get(name) or {}).items()):
            delay.add_metric([group, stage], *_buckets(histogram))
    yield delay


def _buckets(histogram: Mapping[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``le`` buckets and the sum, from per-bucket counts."""
    cumulative, running = [], 0
    for le, count in zip(_LE, histogram["counts"], strict=True):
        running += count
        cumulative.append((le, float(running)))
    return cumulative, float(histogram["sum"])


def _consumer_groups(groups: Sequence[GroupStatus]) -> Iterator[Metric]:
    labels = ["stream", "group"]
    lag = GaugeMetricFamily(
        "multibot_consumer_lag", "Entries not yet delivered to the group.", labels=labels
    )
    pending = GaugeMetricFamily(
        "multibot_consumer_pending", "Entries delivered to the group, not yet acked.", labels=labels
    )
    consumers = GaugeMetricFamily(
        "multibot_consumer_group_consumers", "Consumers in the group.", labels=labels
    )
    for row in groups:
        key = [row.stream, row.group]
        if row.lag is not None:
            lag.add_metric(key, row.lag)
        pending.add_metric(key, row.pending)
        consumers.add_metric(key, row.consumers)
    yield from (lag, pending, consumers)


def _streams(streams: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
    length = GaugeMetricFamily(
        "multibot_stream_length", "Entries in the stream.", labels=["stream"]
    )
    memory = GaugeMetricFamily(
        "multibot_stream_memory_bytes", "Redis memory used by the stream.", labels=["stream"]
    )
    for row in streams:
        length.add_metric([row["stream"]], row["length"])
        if row.get("memory_bytes") is not None:
            memory.add_metric([row["stream"]], row["memory_bytes"])
    yield from (length, memory)


def _archive(archive: ArchiveStatus | None, entries: Mapping[str, int]) -> Iterator[Metric]:
    archived = CounterMetricFamily("multibot_events_archived", "Events stored in PostgreSQL.")
    lag = GaugeMetricFamily(
        "multibot_archive_lag",
        "Entries not yet archived (the archiver group's lag plus pending).",
        labels=["stream"],
    )
    up = GaugeMetricFamily("multibot_archive_up", "1 when the last write to PostgreSQL worked.")
    if archive is not None:
        archived.add_metric([], archive.archived)
        for stream, behind in sorted(entries.items()):
            lag.add_metric([stream], behind)
        up.add_metric([], 1 if archive.healthy else 0)
    yield from (archived, lag, up)


def _bots(bots: Sequence[BotStatus]) -> Iterator[Metric]:
    restarts = CounterMetricFamily(
        "multibot_bot_restarts", "Restarts by the supervisor.", labels=["bot"]
    )
    failed = GaugeMetricFamily(
        "multibot_bot_failed", "1 when the bot gave up after a crash loop.", labels=["bot"]
    )
    up = GaugeMetricFamily(
        "multibot_bot_up",
        "1 when the instance's process runs and is healthy.",
        labels=["bot", "replica"],
    )
    rss = GaugeMetricFamily(
        "multibot_bot_rss_bytes",
        "Resident memory of the instance's process tree.",
        labels=["bot", "replica"],
    )
    for bot in bots:
        restarts.add_metric([bot.id], bot.restarts)
        failed.add_metric([bot.id], 1 if bot.state is InstanceState.FAILED else 0)
        for row in bot.instances:
            key = [bot.id, str(row.instance)]
            running = row.pid is not None and row.state in UP_STATES
            up.add_metric(key, 1 if running else 0)
            if row.rss is not None:
                rss.add_metric(key, row.rss)
    yield from (restarts, failed, up, rss)


def _memory(memory: MemoryStatus | None) -> Iterator[Metric]:
    used = GaugeMetricFamily(
        "multibot_memory_used_bytes",
        "Memory used by Redis, the manager (with its embedded PostgreSQL) and the bots.",
        labels=["part"],
    )
    for part in _MEMORY_PARTS:
        value = getattr(memory, part, None)
        if value is not None:
            used.add_metric([part], value)
    yield used
    budget = memory.budget if memory else None
    yield _gauge("multibot_memory_budget_bytes", "The configured memory budget.", budget)
    redis = memory.redis if memory else None
    yield _gauge("multibot_redis_memory_bytes", "Redis used_memory.", redis)


def _pressure(state: RedisMemoryStatus | None) -> Iterator[Metric]:
    yield _gauge(
        "multibot_redis_maxmemory_bytes",
        "Redis's maxmemory (0: unlimited).",
        state.maxmemory if state else None,
    )
    yield _gauge(
        "multibot_backpressure",
        "1 while publishers are held back because Redis is near its maxmemory.",
        None if state is None else int(state.backpressure),
    )


# -- reading Redis ---------------------------------------------------------------------


async def gather_streams(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Length (XLEN) and memory (MEMORY USAGE) of every stream of the namespace, in one
    pipeline: ``[{"stream": name, "length": n, "memory_bytes": bytes or None}]``.

    ``memory_bytes`` is None where Redis did not answer it (the key vanished, or the
    user may not run MEMORY); a key that stopped being a stream is left out.
    """
    streams = await stream_keys(redis, keys)
    if not streams:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for key in streams:
            pipe.xlen(key)
            pipe.memory_usage(key)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    found = []
    for key, length, memory in zip(streams, replies[0::2], replies[1::2], strict=True):
        if isinstance(length, Exception):
            continue
        found.append(
            {
                "stream": keys.stream_name(key),
                "length": int(length),
                "memory_bytes": int(memory) if isinstance(memory, int) else None,
            }
        )
    return found


async def archive_lag(redis: Redis, keys: Keys, cap: int = DEFAULT_CAP) -> dict[str, int]:
    """Entries the archiver has not stored yet, per stream name: its group's lag (entries
    not read yet) plus its pending entries (read, not yet committed to PostgreSQL).

    The dead-letter stream, which the archiver also stores, is :data:`DEAD_LETTER_STREAM`.
    Lag is counted as ``manager.observe.lag`` does (Redis 6.2 reports none); a backlog past ``cap``
    entries reads as ``cap``.
    """
    dead_letters = keys.dead_letters()
    streams = [*await stream_keys(redis, keys), dead_letters]
    lags = await group_lags(redis, streams, cap, only=ARCHIVER_GROUP)
    return {
        DEAD_LETTER_STREAM if g.stream == dead_letters else keys.stream_name(g.stream): (
            (g.lag or 0) + g.pending
        )
        for g in lags
    }
