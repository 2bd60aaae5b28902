"""A bot consumer in its own process, for tests that kill consumers with SIGKILL.

Run as ``python -m tests.bus.consumer_proc --redis-url URL --bot B --instance I --out FILE``.
It subscribes to ``--pattern`` and appends one line per step to ``--out``, flushed at once so
the test sees progress: ``ready`` once its groups exist, ``taken <event id>`` when a handler
starts, ``handled <event id>`` when it returns. ``--hang-on TYPE`` makes the handler block
forever on that event type; ``--die-on TYPE`` makes it SIGKILL its own process on it (a
crash no ``finally`` survives, like the OOM killer). ``--partitions user=4`` reads that
route as partitions; ``--record`` pushes each handled event's ``seq`` onto the Redis list
``test:order:<key>`` (one order for all processes) after ``--handle-ms`` (at most, at
random) of work. ``--records`` publishes through the bot's outbox and keeps delivery
records (as a bot the manager runs does); ``--handle-ms`` alone is that much work (at most,
at random) in each handler.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
from typing import TextIO

from bus import BusClient, Event
from bus.settings import BusSettings, ConsumerSettings


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--bot", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--out", required=True, help="file to append progress lines to")
    parser.add_argument("--pattern", default="test.#")
    parser.add_argument("--hang-on", default=None, metavar="TYPE")
    parser.add_argument("--die-on", default=None, metavar="TYPE")
    parser.add_argument("--visibility-timeout", type=float, default=60.0)
    parser.add_argument("--max-deliveries", type=int, default=10)
    parser.add_argument("--block-ms", type=int, default=500)
    parser.add_argument("--partitions", action="append", default=[], metavar="STREAM=N")
    parser.add_argument("--partition-ttl", type=float, default=10.0)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--handle-ms", type=float, default=0.0)
    parser.add_argument("--records", action="store_true")
    return parser.parse_args(argv)


def _note(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


async def _consume(args: argparse.Namespace, out: TextIO) -> None:
    partitions = {name: int(n) for name, _, n in (p.partition("=") for p in args.partitions)}
    settings = BusSettings(
        redis_url=args.redis_url,
        partitions=partitions,
        outbox=args.records,
        delivery_records=args.records,
        consumer=ConsumerSettings(
            visibility_timeout=args.visibility_timeout,
            max_deliveries=args.max_deliveries,
            block_ms=args.block_ms,
            partition_ttl=args.partition_ttl,
            start_id="0",
        ),
    )
    async with BusClient(args.bot, settings=settings, instance=args.instance) as bus:

        @bus.subscribe(args.pattern)
        async def handle(event: Event) -> None:
            _note(out, f"taken {event.id}")
            if event.type == args.die_on:
                os.kill(os.getpid(), signal.SIGKILL)
            if event.type == args.hang_on:
                await asyncio.Event().wait()
            if args.record:
                await record(bus, event, args.handle_ms)
            elif args.handle_ms:
                await asyncio.sleep(random.uniform(0, args.handle_ms) / 1000)
            _note(out, f"handled {event.id}")

        run = asyncio.create_task(bus.run())
        ready = asyncio.create_task(bus.wait_ready(timeout=30))
        await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
        if run.done():  # run() failed before the groups existed: raise why
            ready.cancel()
            await run
        await ready
        _note(out, "ready")
        await run


async def record(bus: BusClient, event: Event, handle_ms: float) -> None:
    """Some work, then the event's ``seq`` onto its key's list (see the module)."""
    await asyncio.sleep(random.uniform(0, handle_ms) / 1000)
    await bus.redis.rpush(f"test:order:{event.key}", event.data["seq"])


def main(argv: list[str] | None = None) -> None:
    """Consume until killed."""
    args = _parse_args(argv)
    with open(args.out, "a", encoding="utf-8") as out:
        asyncio.run(_consume(args, out))


if __name__ == "__main__":
    main()
