"""``multibot bench --repeat N``: the same run N times, each run's figures and the median.

A shared machine's load moves absolute figures from run to run, so what a run says is its
bus against its own baseline; repeating it says how steady that ratio is. Each run starts
afresh (its own private Redis unless one is given, its own namespace).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from manager.bench.report import BenchReport

#: (column title, width, the figure of a run (None when it has none), format).
_COLUMNS: tuple[tuple[str, int, Callable[[BenchReport], float | None], str], ...] = (
    ("bus ev/s", 10, lambda r: r.bus.events_per_s, ".0f"),
    ("bus p95 ms", 11, lambda r: r.bus.latency.p95_ms, ".3f"),
    ("base p95 ms", 12, lambda r: r.baseline.latency.p95_ms if r.baseline else None, ".3f"),
    ("p95 bus/base", 13, lambda r: _ratio(r.bus.latency.p95_ms, r.baseline), ".2f"),
    ("bus p99 ms", 11, lambda r: r.bus.latency.p99_ms, ".3f"),
    ("relay p95 ms", 13, lambda r: _p95(r.relayed_baseline), ".3f"),
    ("p95 bus/relay", 14, lambda r: _ratio(r.bus.latency.p95_ms, r.relayed_baseline), ".2f"),
    ("lost", 5, lambda r: r.lost, ".0f"),
)


def _p95(phase: Any) -> float | None:
    return None if phase is None else float(phase.latency.p95_ms)


def _ratio(bus_p95: float, baseline: Any) -> float | None:
    if baseline is None or not baseline.latency.p95_ms:
        return None
    return float(bus_p95 / baseline.latency.p95_ms)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summary_table(reports: Sequence[BenchReport]) -> str:
    """One line per run and one of medians (the lost column: the sum)."""
    relayed = any(r.relayed_baseline for r in reports)
    columns = [c for c in _COLUMNS if relayed or not c[0].startswith(("relay", "p95 bus/relay"))]
    head = "run " + "".join(title.rjust(width) for title, width, _, _ in columns)
    lines = [head]

    def line(label: str, values: Sequence[float | None]) -> str:
        cells = [
            ("-" if v is None else format(v, fmt)).rjust(width)
            for v, (_, width, _, fmt) in zip(values, columns, strict=True)
        ]
        return label.ljust(4) + "".join(cells)

    rows = [[figure(r) for _, _, figure, _ in columns] for r in reports]
    lines += [line(str(n), row) for n, row in enumerate(rows, 1)]
    medians = [_median(column) for column in zip(*rows, strict=True)]
    medians[-1] = float(sum(r.lost for r in reports))
    lines.append(line("med", medians))
    worst = max((v for v in (row[3] for row in rows) if v is not None), default=None)
    if worst is not None:
        lines.append(f"p95 bus/baseline: worst run {worst:.2f}, median {medians[3]:.2f}")
    if relayed:
        worst_relay = max((v for v in (row[6] for row in rows) if v is not None), default=None)
        if worst_relay is not None:
            lines.append(
                f"p95 bus/relayed baseline: worst run {worst_relay:.2f}, median {medians[6]:.2f}"
            )
    return "\n".join(lines)


def summary_json(reports: Sequence[BenchReport]) -> dict[str, Any]:
    """Every run's ``--json`` object under ``runs``, and the medians of the main figures."""
    rows = [[figure(r) for _, _, figure, _ in _COLUMNS] for r in reports]
    keys = ("bus_events_per_s", "bus_p95_ms", "baseline_p95_ms", "p95_bus_vs_baseline",
            "bus_p99_ms", "relayed_baseline_p95_ms", "p95_bus_vs_relayed_baseline")  # fmt: skip
    medians = {
        key: None if (m := _median(column)) is None else round(m, 3)
        for key, column in zip(keys, zip(*rows, strict=True), strict=False)
    }
    ratios = [row[3] for row in rows if row[3] is not None]
    relayed = [row[6] for row in rows if row[6] is not None]
    return {
        "repeat": len(reports),
        "runs": [r.to_json() for r in reports],
        "median": medians,
        "worst_p95_bus_vs_baseline": round(max(ratios), 3) if ratios else None,
        "worst_p95_bus_vs_relayed_baseline": round(max(relayed), 3) if relayed else None,
        "lost": sum(r.lost for r in reports),
    }
