"""Benchmark results: exact percentiles, lost and duplicated events, the table and the JSON."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from manager.bench.options import BenchOptions
from manager.bench.recording import Tally, WorkerResult


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The nearest-rank ``pct`` percentile of ascending ``ordered`` (NaN when empty).

    Nearest rank returns a value that was measured: p50 of 1..4 is 2, p100 is the max.
    """
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Latency percentiles in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Iterable[float]) -> LatencyStats:
        """Stats of latencies given in seconds."""
        ordered = sorted(seconds)
        p50, p95, p99, top = (percentile(ordered, p) * 1000 for p in (50, 95, 99, 100))
        return cls(p50, p95, p99, top)


def count_deliveries(tallies: Sequence[Tally], seen: Sequence[dict[int, bytes]]) -> tuple[int, int]:
    """``(lost, duplicated)``: confirmed events never handled, and extra deliveries.

    ``tallies`` say what each producer published; ``seen`` holds, per consumer process and
    producer, a delivery count per seq.
    """
    failed = {key for tally in tallies for key in tally.failed}
    lost = duplicated = 0
    for tally in tallies:
        for producer, attempted in tally.attempted.items():
            counts = _merge([s[producer] for s in seen if producer in s])[:attempted]
            zeros = counts.count(0) + attempted - len(counts)
            if failed:
                zeros -= sum(
                    1 for seq in range(attempted)
                    if (producer, seq) in failed and (seq >= len(counts) or not counts[seq])
                )  # fmt: skip
            lost += zeros
            if len(counts) - counts.count(0) - counts.count(1):  # any seq seen twice?
                duplicated += sum(c - 1 for c in counts if c > 1)
    return lost, duplicated


def _merge(parts: list[bytes]) -> bytes:
    if len(parts) <= 1:
        return parts[0] if parts else b""
    return bytes(min(255, sum(c)) for c in zip_longest(*parts, fillvalue=0))


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """What one phase (bus or baseline) achieved."""

    #: Events published (and confirmed) per second in the measured window.
    published_per_s: float
    #: Events handled in the window / (first publish → last handle) in seconds.
    events_per_s: float
    latency: LatencyStats
    #: How long a publish call (one send: an event, or a batch) took to be confirmed.
    publish: LatencyStats
    #: Events published in the measured window that were handled.
    events: int
    lost: int
    duplicated: int
    #: Peak RSS (MiB) of each worker process, by label.
    rss_mb: dict[str, float]
    #: Seconds the consumers took to catch up after the producers stopped.
    drain_s: float = 0.0


def summarize(
    results: Sequence[WorkerResult], options: BenchOptions, drain_s: float = 0.0
) -> PhaseResult:
    """Merge the worker results of one phase (``drain_s``: its catch-up time)."""
    latencies = [x for r in results for x in r.latencies]
    first = min((r.first_sent for r in results), default=math.inf)
    last = max((r.last_handled for r in results), default=0.0)
    span = last - first
    lost, duplicated = count_deliveries([r.tally for r in results], [r.seen for r in results])
    return PhaseResult(
        published_per_s=sum(r.tally.measured for r in results) / options.duration,
        events_per_s=len(latencies) / span if latencies and span > 0 else 0.0,
        latency=LatencyStats.of(latencies),
        publish=LatencyStats.of([x for r in results for x in r.tally.publish_latencies]),
        events=len(latencies),
        lost=lost,
        duplicated=duplicated,
        rss_mb={r.label: r.peak_rss_mb for r in sorted(results, key=lambda r: r.index)},
        drain_s=drain_s,
    )


def _num(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


@dataclass(frozen=True, slots=True)
class BenchReport:
    """A whole run: the bus phase, the baseline phase (if run) and the idle client's RSS."""

    options: BenchOptions
    bus: PhaseResult
    baseline: PhaseResult | None
    idle_client_rss_mb: float
    redis_version: str
    #: Whether the run started its own redis-server (without persistence).
    private_redis: bool = False

    @property
    def offered_per_s(self) -> float:
        """The configured rate; flat out, the rate the bus producers achieved."""
        return self._offered(self.bus)

    def _offered(self, phase: PhaseResult) -> float:
        return phase.published_per_s if self.options.flat_out else self.options.rate

    @property
    def bus_vs_baseline(self) -> float | None:
        """Bus events/s as a fraction of the baseline's."""
        if self.baseline is None or not self.baseline.events_per_s:
            return None
        return self.bus.events_per_s / self.baseline.events_per_s

    @property
    def lost(self) -> int:
        """Events lost in either phase."""
        return self.bus.lost + (self.baseline.lost if self.baseline else 0)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` line's object (NaN, e.g. no events handled, becomes null)."""
        opts, ratio = self.options, self.bus_vs_baseline
        baseline = _phase_json(self.baseline or self.bus, "baseline_")
        if self.baseline is None:
            baseline = dict.fromkeys(baseline)
        return {
            "offered_per_s": round(self.offered_per_s, 1),
            **_phase_json(self.bus, ""),
            "rss_mb_by_process": {k: round(v, 1) for k, v in self.bus.rss_mb.items()},
            "idle_client_rss_mb": round(self.idle_client_rss_mb, 1),
            "bus_vs_baseline": None if ratio is None else round(ratio, 3),
            **baseline,
            "producers": opts.producers,
            "consumers": opts.consumers,
            "processes": len(opts.layout()),
            "rate": opts.rate,
            "flat_out": opts.flat_out,
            "batch": opts.batch_size,
            "read_count": opts.read_size,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "redis_version": self.redis_version,
            "private_redis": self.private_redis,
            "bot_user": opts.bot_user,
            "publish_replicas": opts.publish_replicas,
            "partitions": opts.partitions,
        }

    def table(self) -> str:
        """The human-readable report: bus and baseline side by side."""
        opts, bus, base = self.options, self.bus, self.baseline
        rate = "flat out" if opts.flat_out else f"{opts.rate:g} events/s offered"
        lines = [
            f"multibot bench: {opts.producers} producers -> {opts.consumers} consumers, "
            f"{len(opts.layout())} processes, {rate}, batch {opts.batch_size}, "
            f"read count {opts.read_size}, "
            f"{opts.duration:g} s (+{opts.warmup:g} s warmup), redis {self.redis_version}"
            + (" (private, no persistence)" if self.private_redis else "")
            + (", bus as a bot's ACL user" if opts.bot_user else ", bus as the URL's user")
            + (f", {opts.partitions} partitions" if opts.partitions > 1 else "")
            + (
                f", publishes confirmed on {opts.publish_replicas} replica(s)"
                if opts.publish_replicas
                else ""
            ),
            "",
            f"{'':28}{'bus':>12}{'baseline':>12}",
        ]

        def row(name: str, value: Any, fmt: str) -> None:
            cells = [format(value(p), fmt) if p else "-" for p in (bus, base)]
            lines.append(f"{name:28}{cells[0]:>12}{cells[1]:>12}")

        row("offered events/s", self._offered, ".1f")
        row("published events/s", lambda p: p.published_per_s, ".1f")
        row("achieved events/s (1)", lambda p: p.events_per_s, ".1f")
        for name, attr in (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")):
            row(f"latency {name} ms (2)", lambda p, a=attr: getattr(p.latency, a), ".3f")
        row("latency max ms (2)", lambda p: p.latency.max_ms, ".3f")
        row("publish call p50 ms", lambda p: p.publish.p50_ms, ".3f")
        row("publish call p95 ms", lambda p: p.publish.p95_ms, ".3f")
        row("events measured", lambda p: p.events, "d")
        row("lost (3)", lambda p: p.lost, "d")
        row("duplicated", lambda p: p.duplicated, "d")
        row("drain after producers s (3)", lambda p: p.drain_s, ".2f")
        ratio = self.bus_vs_baseline
        lines += [
            "",
            f"bus / baseline events/s: {'-' if ratio is None else f'{ratio:.2f}'}",
            "(1) events handled in the measured window / (first publish -> last handle)",
            "(2) publish call -> handler start, events published in the measured window",
            "(3) after the producers stop the consumers catch up (drain) until done or stalled "
            f"for {opts.drain:g} s;",
            "    lost = confirmed events still unhandled then",
            "",
            "peak RSS per process:",
        ]
        for phase in (bus, base):
            for label, mb in (phase.rss_mb if phase else {}).items():
                lines.append(f"  {label:40}{mb:8.1f} MiB")
        lines.append(f"  {'idle bus client (1 subscription)':40}{self.idle_client_rss_mb:8.1f} MiB")
        return "\n".join(lines)


def _phase_json(phase: PhaseResult, prefix: str) -> dict[str, Any]:
    lat = phase.latency
    items: dict[str, Any] = {
        "published_per_s": round(phase.published_per_s, 1),
        "events_per_s": round(phase.events_per_s, 1),
        "events": phase.events,
        "p50_ms": _num(lat.p50_ms, 3),
        "p95_ms": _num(lat.p95_ms, 3),
        "p99_ms": _num(lat.p99_ms, 3),
        "max_ms": _num(lat.max_ms, 3),
        "publish_p50_ms": _num(phase.publish.p50_ms, 3),
        "publish_p95_ms": _num(phase.publish.p95_ms, 3),
        "publish_p99_ms": _num(phase.publish.p99_ms, 3),
        "lost": phase.lost,
        "duplicated": phase.duplicated,
        "rss_mb": round(max(phase.rss_mb.values(), default=0.0), 1),
        "drain_s": round(phase.drain_s, 2),
    }
    return {prefix + key: value for key, value in items.items()}
