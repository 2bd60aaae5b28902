"""The measured window of a load process (``http_load``, ``publish_load``): what completed
in it, the CPU spent over it, and its summary as one JSON-able dict, the same for both so
that ``multibot bench-api`` compares like with like."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil

from manager.bench.report import LatencyStats

#: The outcome :meth:`Window.note` counts as accepted (HTTP's answer to a publish).
ACCEPTED = "202"


@dataclass(slots=True)
class Window:
    """The measured interval and what completed in it, shared by a process's workers."""

    start: float
    duration: float
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)

    @classmethod
    def after(cls, warmup: float, duration: float) -> Window:
        """The window opening ``warmup`` seconds from now, ``duration`` seconds long."""
        return cls(start=time.perf_counter() + warmup, duration=duration)

    @property
    def end(self) -> float:
        """When the window closes (on the ``time.perf_counter`` clock)."""
        return self.start + self.duration

    def note(self, sent: float, done: float, outcome: str) -> None:
        """Record a call answered at ``done`` (:data:`ACCEPTED`, or what went wrong), if
        that is inside the window."""
        if not self.start <= done < self.end:
            return
        self.latencies.append(done - sent)
        if outcome == ACCEPTED:
            self.accepted += 1
        else:
            self.errors[outcome] += 1

    async def clock_cpu(self, server: psutil.Process | None) -> None:
        """Take this process's CPU seconds (and ``server``'s) over the window, into
        :attr:`cpu`; returns when the window closes."""

        def now() -> tuple[float, float]:
            return time.process_time(), sum(server.cpu_times()[:2]) if server else 0.0

        await asyncio.sleep(self.start - time.perf_counter())
        load, served = now()
        await asyncio.sleep(self.end - time.perf_counter())
        load_end, served_end = now()
        self.cpu["load"] = load_end - load
        if server is not None:
            self.cpu["server"] = served_end - served

    def summary(self, *, batch: int, concurrency: int, warmup: float) -> dict[str, Any]:
        """Calls and events accepted per second, latency p50/p95/p99/max in ms, errors by
        kind, the CPU share of this process (and of the server, if clocked; 100 is a core)."""
        duration = self.duration
        lat = LatencyStats.of(self.latencies)
        requests = len(self.latencies)
        server = self.cpu.get("server")
        return {
            "batch": batch,
            "concurrency": concurrency,
            "duration_s": duration,
            "warmup_s": warmup,
            "requests": requests,
            "requests_per_s": round(requests / duration, 1),
            "events_accepted": self.accepted * batch,
            "events_per_s": round(self.accepted * batch / duration, 1),
            "latency_ms": {
                "p50": round(lat.p50_ms, 2),
                "p95": round(lat.p95_ms, 2),
                "p99": round(lat.p99_ms, 2),
                "max": round(lat.max_ms, 2),
            }
            if requests
            else None,
            "errors": dict(sorted(self.errors.items())),
            "load_cpu_percent": round(100 * self.cpu.get("load", 0.0) / duration, 1),
            "server_cpu_percent": None if server is None else round(100 * server / duration, 1),
        }
