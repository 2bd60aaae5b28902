"""A bot for tests/bots/test_runtime_process.py: once its consumer reads, it writes the
names of the modules its process has loaded to stdout (one JSON line), then idles until
the runtime stops it.

With :data:`MODEL_ENV` set its handler asks for a pydantic model (``model=``), which is
what loads pydantic into a bot process; without it, the handler takes plain events.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import orjson

from bus import BusClient, Event

#: Set (to anything) in the bot's environment: subscribe with a model.
MODEL_ENV = "RUNTIME_PROBE_MODEL"


async def main(bus: BusClient) -> None:
    """Subscribe one handler, report the loaded modules once reading, idle until stopped."""
    if os.environ.get(MODEL_ENV):
        from bus import UserMessage

        async def parsed(event: Event, data: Any) -> None:
            """Take the parsed event and do nothing."""

        bus.subscribe("probe.model", parsed, model=UserMessage)
    else:

        async def plain(event: Event) -> None:
            """Take the event and do nothing."""

        bus.subscribe("probe.plain", plain)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_report(bus))
        await bus.run()


async def _report(bus: BusClient) -> None:
    await bus.wait_ready(timeout=60)
    sys.stdout.buffer.write(orjson.dumps(sorted(sys.modules)) + b"\n")
    sys.stdout.flush()
