"""Bots whose delivery records the status page's event view shows: one handles every
``note.*`` event, one fails on every event, so each leaves a different trail."""

from __future__ import annotations

from bus import BusClient, Event


async def scribe(bus: BusClient) -> None:
    """Handles every ``note.*`` event; files each ``note.posted`` as a ``note.filed``
    (caused by it, so the two make a chain)."""

    async def handle(event: Event) -> None:
        if event.type == "note.posted":
            await bus.publish("note.filed", {"note": event.id})

    bus.subscribe("note.*", handle)
    await bus.run()


async def grumpy(bus: BusClient) -> None:
    """Raises on every ``note.*`` event, so each is retried and then dead-lettered."""

    async def handle(event: Event) -> None:
        raise RuntimeError(f"grumpy refuses {event.type}")

    bus.subscribe("note.*", handle)
    await bus.run()
