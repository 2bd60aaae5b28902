"""The bot ``multibot bench-manager`` weighs idle: one subscription, no models.

A bot whose handler takes plain events loads what every bot loads (the runtime, the bus
client, structlog, uvloop, redis-py) and nothing a feature of the bus would add, pydantic
included. The manager runs it like any bot of its config; :mod:`manager.bench.idle_memory`
compares its RSS with a bare worker's.
"""

from __future__ import annotations

from bus import BusClient, Event

#: The one event type it subscribes to (no one publishes it).
PATTERN = "bench.idle.ping"


async def main(bus: BusClient) -> None:
    """Subscribe one handler and consume until the manager stops the bot."""

    @bus.subscribe(PATTERN)
    async def ignore(event: Event) -> None:
        """Take the event and do nothing with it."""

    await bus.run()
