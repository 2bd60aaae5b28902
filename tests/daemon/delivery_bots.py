"""Bots of the delivery-trail tests: one handles ``note.*`` events, one refuses them."""

from __future__ import annotations

import asyncio

from bus import BusClient, Event
from bus.settings import RetrySettings

#: Two attempts, quickly: the refuser's dead letters say ``attempts 2``.
TWICE = RetrySettings(max_attempts=2, backoff_base=0.01, backoff_cap=0.01)


async def noter(bus: BusClient) -> None:
    """Handles every ``note.*`` event, with a little work."""

    async def note(event: Event) -> None:
        await asyncio.sleep(0.02)

    bus.subscribe("note.#", note)
    await bus.run()


async def refuser(bus: BusClient) -> None:
    """Fails on every ``note.*`` event: dead-lettered after two attempts."""

    async def refuse(event: Event) -> None:
        raise RuntimeError(f"{event.type} is not for me")

    bus.subscribe("note.#", refuse, retry=TWICE)
    await bus.run()
