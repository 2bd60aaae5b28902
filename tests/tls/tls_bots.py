"""A bot the TLS tests run under a real manager: it says how it reaches Redis, and answers."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from bus import BusClient, Event


async def reporter(bus: BusClient) -> None:
    """Publishes ``test.tls.url`` (its URL's scheme and query options, no credentials), then
    answers each ``test.tls.ping`` with a ``test.tls.pong`` carrying the ping's ``n``."""
    url = urlsplit(bus.settings.redis_url)
    await bus.publish("test.tls.url", {"scheme": url.scheme, "query": dict(parse_qsl(url.query))})

    async def pong(event: Event) -> None:
        await bus.publish("test.tls.pong", {"n": event.data["n"]})

    bus.subscribe("test.tls.ping", pong)
    await bus.run()
