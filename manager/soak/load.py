"""A soak load process: publish ``soak.tick`` at a fixed rate through faults, record each
confirmation.

Run as ``python -m manager.soak.load OUT RATE NAMESPACE`` with the Redis URL in the
environment (:data:`URL_ENV`: it carries a password, so never on the command line). Every
:data:`TICK` seconds it starts the publishes that are due, each one concurrent
(``BusClient.publish``, ordering key ``k<n mod 64>``), :data:`CONCURRENCY` of them waiting
on Redis at once and at most :data:`MAX_IN_FLIGHT` started.
A publish that returned is *confirmed* (Redis gave it an entry id) and appended to ``OUT``
as ``<event id> <wall time>``; one that raised is not, and is counted as refused by kind
(``backpressure`` for :class:`~bus.errors.BusBackpressureError`, ``unavailable`` for
connection and publish errors, ``error:<name>`` for any other Redis answer). After a refusal
publishing pauses :data:`BACKOFF` seconds, and a schedule more than one second behind skips
ahead rather than bursting. SIGTERM stops it: in-flight publishes finish (bounded), then
``OUT.json`` gets the counts and the achieved rate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import structlog
import uvloop
from redis.exceptions import RedisError

from bus import BusClient
from bus.errors import BusBackpressureError, BusConnectionError, BusError, PublishError
from bus.settings import BusSettings
from manager.soak.bot import TICK as TICK_TYPE

log = structlog.get_logger("manager.soak")

URL_ENV = "SOAK_REDIS_URL"
TICK = 0.01  # seconds between scheduling rounds
MAX_IN_FLIGHT = 5000  # publishes started and not finished (the rest of a round is skipped)
CONCURRENCY = 64  # publishes waiting on Redis at once (each holds a connection)
BACKOFF = 0.2  # seconds without new publishes after one was refused
KEYS = 64  # ordering keys the ticks spread over
STOP_GRACE = 30.0  # seconds in-flight publishes get after SIGTERM


class Load:
    """The publishing loop of one load process, with its counters."""

    def __init__(self, bus: BusClient, out: Path, rate: float) -> None:
        self.bus = bus
        self.rate = rate
        self._out = out.open("a", buffering=1 << 16)
        self.attempted = 0
        self.confirmed = 0
        self.refused: Counter[str] = Counter()
        self.skipped = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._paused_until = 0.0
        self._slots = asyncio.Semaphore(CONCURRENCY)

    def __repr__(self) -> str:
        refused = sum(self.refused.values())
        return f"<Load rate={self.rate} confirmed={self.confirmed} refused={refused}>"

    async def run(self, stop: asyncio.Event) -> dict[str, object]:
        """Publish until ``stop`` is set; the summary."""
        started = time.monotonic()
        scheduled = 0.0  # events due so far by the schedule
        while not stop.is_set():
            now = time.monotonic()
            scheduled = max(scheduled, (now - started) * self.rate - self.rate)  # skip, no burst
            due = int((now - started) * self.rate - scheduled)
            if now >= self._paused_until and due > 0:
                room = MAX_IN_FLIGHT - len(self._in_flight)
                for _ in range(min(due, room)):
                    self._start(self.attempted)
                self.skipped += max(0, due - room)
                scheduled += due
            self._out.flush()
            await asyncio.sleep(TICK)
        active = time.monotonic() - started
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=STOP_GRACE)
        self._out.close()
        return {
            "attempted": self.attempted,
            "confirmed": self.confirmed,
            "refused": dict(self.refused),
            "skipped": self.skipped,
            "seconds": round(active, 3),
            "achieved_rate": round(self.confirmed / active, 1) if active else 0.0,
        }

    def _start(self, n: int) -> None:
        self.attempted += 1
        task = asyncio.get_running_loop().create_task(self._publish(n))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _publish(self, n: int) -> None:
        try:
            async with self._slots:
                event_id = await self.bus.publish(TICK_TYPE, {"n": n}, key=f"k{n % KEYS}")
        except BusBackpressureError as exc:
            self._refused("backpressure", exc)
        except (BusConnectionError, PublishError, OSError) as exc:
            self._refused("unavailable", exc)
        except (RedisError, BusError) as exc:
            self._refused(f"error:{type(exc).__name__}", exc)
        else:
            self.confirmed += 1
            self._out.write(f"{event_id} {time.time():.6f}\n")

    def _refused(self, kind: str, exc: BaseException) -> None:
        if not self.refused[kind]:  # the first of each kind, for the log
            log.warning(
                "soak load: publish refused", kind=kind, error=f"{type(exc).__name__}: {exc}"
            )
        self.refused[kind] += 1
        self._paused_until = time.monotonic() + BACKOFF


async def _main(out: Path, rate: float, namespace: str) -> None:
    settings = BusSettings(redis_url=os.environ[URL_ENV], namespace=namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with BusClient("soak-load", settings=settings) as bus:
        summary = await Load(bus, out, rate).run(stop)
    out.with_suffix(".json").write_bytes(orjson.dumps(summary))


def main() -> None:
    """The process entry (see the module doc)."""
    out, rate, namespace = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    uvloop.run(_main(out, rate, namespace))


if __name__ == "__main__":
    main()
