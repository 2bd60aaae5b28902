"""Benchmark results: exact percentiles, lost and duplicated events, the table and the JSON."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

from manager.bench.options import BenchOptions
from manager.bench.recording import Tally, WorkerResult

if TYPE_CHECKING:
    from manager.bench.copy_watch import CopyResult


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
    #: Deliveries handled in all (warmup, repeats and drain included).
    handled: int = 0
    #: Wall-clock time the last event published in the measured window was handled.
    last_handled: float = 0.0


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
        handled=sum(r.handled for r in results),
        last_handled=last,
    )


def _num(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


@dataclass(frozen=True, slots=True)
class RecordsResult:
    """The bus phase run again with delivery records on, and what became of the records."""

    phase: PhaseResult
    copy: CopyResult

    def ratio(self, off: PhaseResult, value: Callable[[PhaseResult], float]) -> float | None:
        """``value`` of this phase over that of ``off`` (records off); None if undefined."""
        on, base = value(self.phase), value(off)
        if math.isnan(on) or math.isnan(base) or not base:
            return None
        return on / base

    def to_json(self, off: PhaseResult) -> dict[str, Any]:
        """The ``records_`` fields of the ``--json`` line (``off``: the phase without)."""
        throughput = self.ratio(off, lambda p: p.events_per_s)
        p95 = self.ratio(off, lambda p: p.latency.p95_ms)
        return {
            **_phase_json(self.phase, "records_"),
            "records_rss_mb_by_process": {k: round(v, 1) for k, v in self.phase.rss_mb.items()},
            "records_vs_bus_events_per_s": None if throughput is None else round(throughput, 3),
            "records_vs_bus_p95": None if p95 is None else round(p95, 3),
            **{f"records_{key}": value for key, value in self.copy.to_json().items()},
        }

    def lines(self, private_postgres: bool) -> list[str]:
        """The table's section on the records: copied, lag, backlog, disk."""
        copy, mib = self.copy, 1024 * 1024
        lag = "- (not all copied)" if copy.lag_s is None else f"{copy.lag_s:.3f}"
        per = copy.bytes_per_delivery
        disk = f"{copy.disk_bytes} bytes" + (
            ""
            if per is None
            else f": {per:.1f} per delivery, {per * 1e6 / mib:.1f} MiB per million"
        )
        where = "a private PostgreSQL" if private_postgres else "the --postgres-dsn server"
        return [
            f"delivery records of the bus+records phase, copied into {where}:",
            f"  {'records copied':34}{copy.copied} of {copy.handled} deliveries handled, "
            f"{copy.dropped} dropped",
            f"  {'copy lag s (4)':34}{lag}",
            f"  {'largest backlog (5)':34}deliveries stream {copy.stream_backlog_max}, "
            f"consumer outbox {copy.outbox_backlog_max}",
            f"  {'left uncopied':34}deliveries stream {copy.left_in_stream}, "
            f"consumer outbox {copy.left_in_outbox}",
            f"  {'disk (deliveries partitions)':34}{disk}",
            "(4) the phase's last event handled -> the copier's last batch stored, acked, deleted",
            "(5) stream entries (one per consumer ack batch), sampled every 0.5 s during the "
            "phase and its copy",
        ]


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
    #: The bus phase again with delivery records on (``--deliveries``).
    records: RecordsResult | None = None
    #: The baseline through a bare relay (``--relay-baseline``): the floor of two hops.
    relayed_baseline: PhaseResult | None = None

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
        """Events lost in any phase."""
        phases = (
            self.baseline,
            self.records.phase if self.records else None,
            self.relayed_baseline,
        )
        return self.bus.lost + sum(p.lost for p in phases if p)

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
            **(
                {
                    **self.records.to_json(self.bus),
                    "records_private_postgres": opts.postgres_dsn is None,
                }
                if self.records
                else {}
            ),
            **baseline,
            **(
                _phase_json(self.relayed_baseline, "relayed_baseline_")
                if self.relayed_baseline
                else {}
            ),
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
        """The human-readable report: bus (and bus+records) and baseline side by side."""
        opts, bus, base, rec = self.options, self.bus, self.baseline, self.records
        relayed = self.relayed_baseline
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
            f"{'':28}{'bus':>12}"
            + (f"{'bus+records':>12}{'on/off':>8}" if rec else "")
            + f"{'baseline':>12}"
            + (f"{'+relay':>12}" if relayed else ""),
        ]

        def row(name: str, value: Any, fmt: str, *, ratio: bool = False) -> None:
            cells = [format(value(p), fmt) if p else "-" for p in (bus, base, relayed)]
            middle = ""
            if rec:
                on_off = rec.ratio(bus, value) if ratio else None
                cells_on = format(value(rec.phase), fmt)
                middle = f"{cells_on:>12}{'' if on_off is None else f'{on_off:.2f}':>8}"
            last = f"{cells[2]:>12}" if relayed else ""
            lines.append(f"{name:28}{cells[0]:>12}{middle}{cells[1]:>12}{last}")

        row("offered events/s", self._offered, ".1f")
        row("published events/s", lambda p: p.published_per_s, ".1f")
        row("achieved events/s (1)", lambda p: p.events_per_s, ".1f", ratio=True)
        for name, attr in (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")):
            row(
                f"latency {name} ms (2)",
                lambda p, a=attr: getattr(p.latency, a),
                ".3f",
                ratio=name == "p95",
            )
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
        ]
        if relayed:
            lines += [
                "+relay: the baseline, its producers writing to an outbox that a bare relay in",
                "    this process moves to the stream (one XREAD, one script), as bots publish",
            ]
        if rec:
            lines += [
                "on/off: bus+records (delivery records on) / bus (off), same workload, run "
                "back to back",
                "",
                *rec.lines(private_postgres=opts.postgres_dsn is None),
            ]
        lines += ["", "peak RSS per process:"]
        for phase in (bus, rec.phase if rec else None, base, relayed):
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
