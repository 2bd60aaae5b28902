"""A bot whose import never returns: it never sends a single heartbeat."""

from __future__ import annotations

import time

from bus import BusClient

time.sleep(3600)  # the point of this module: an import that hangs


async def main(bus: BusClient) -> None:
    """Never reached."""
    await bus.run()
