"""``python -m manager.bench.publish_load``: publish with the bus client itself and print
one JSON line, the yardstick of ``multibot bench-api``.

The same load as :mod:`manager.bench.http_load` with HTTP taken away: one process, each of
``--concurrency`` workers awaiting one call at a time, back to back: ``await bus.publish()``
of one event (``--batch 1``) or ``await bus.publish_many()`` of ``--batch`` events (one
pipeline), the events as the HTTP load sends them. The client is a plain one of the
manager's Redis (the URL the manager's control socket gives, as its own publishing client
has it, with the backpressure check), publishing straight to the streams. Calls completing
in the first ``--warmup`` seconds are not counted; those in the next ``--duration`` are.

The Redis URL (which holds a password) and the namespace are read from the first two lines
of stdin, never taken from the command line, which every local user can read (``ps``).

Printed: calls and events confirmed per second, the latency of a call (p50/p95/p99/max
ms), failed calls by error type, and the CPU share of this process over the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import uvloop
from redis.exceptions import RedisError

from bus import BusClient
from bus.errors import BusError
from bus.settings import BusSettings
from manager.bench.http_load import EVENT_TYPE
from manager.bench.load_window import ACCEPTED, Window

#: The bus client's name (its events' ``source``).
SOURCE = "bench-api"


async def _worker(bus: BusClient, batch: int, window: Window) -> None:
    """Publish back to back, one call in flight, until the window closes."""
    clock = time.perf_counter
    data = [{"n": n, "bench": "api"} for n in range(batch)]
    while clock() < window.end:
        sent = clock()
        try:
            if batch == 1:
                await bus.publish(EVENT_TYPE, data[0])
            else:
                await bus.publish_many([bus.event(EVENT_TYPE, d) for d in data])
        except (BusError, RedisError, OSError) as exc:
            window.note(sent, clock(), type(exc).__name__)
            await asyncio.sleep(0.01)  # Redis away: do not spin
        else:
            window.note(sent, clock(), ACCEPTED)


async def run_publish_load(
    redis_url: str,
    namespace: str,
    *,
    batch: int,
    concurrency: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """Publish to ``redis_url`` in ``namespace``; the results as a JSON-able dict (the
    fields of ``http_load``'s but the request size and the server's CPU)."""
    settings = BusSettings(redis_url=redis_url, namespace=namespace)
    async with BusClient(SOURCE, settings=settings) as bus:
        await bus.redis.ping()  # connected before the clock starts
        window = Window.after(warmup, duration)
        async with asyncio.TaskGroup() as group:
            group.create_task(window.clock_cpu(None))
            for _ in range(concurrency):
                group.create_task(_worker(bus, batch, window))
    result = window.summary(batch=batch, concurrency=concurrency, warmup=warmup)
    del result["server_cpu_percent"]
    return result


def main(argv: list[str] | None = None) -> None:
    """The command line: publish, then print the results as one JSON line."""
    parser = argparse.ArgumentParser(
        prog="python -m manager.bench.publish_load", description=__doc__
    )
    parser.add_argument("--batch", type=int, default=1, help="events per call (1: publish)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.concurrency < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--batch and --concurrency must be >= 1, --duration > 0, --warmup >= 0")
    redis_url, namespace = sys.stdin.readline().strip(), sys.stdin.readline().strip()
    if not redis_url or not namespace:
        parser.error("stdin must hold the Redis URL and the namespace, one a line")
    result = uvloop.run(
        run_publish_load(
            redis_url,
            namespace,
            batch=args.batch,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
        )
    )
    print(json.dumps(result), flush=True)  # noqa: T201 - the output is this line


if __name__ == "__main__":
    main()
