"""Catching up before going live: history from Redis and the archive, then the group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bus.backoff import REDIS_RETRY
from bus.errors import GroupMissingError
from bus.event import Event
from bus.groups import ensure_group
from bus.patterns import Pattern
from bus.replay import replay

if TYPE_CHECKING:
    from bus.client import BusClient


#: How long catching up waits for the manager to create a group the bot may not create.
GROUP_WAIT = 30.0


def _group_key(client: BusClient, stream: str) -> str:
    """Where the bot's group reads ``stream``: its inbox under the manager, else the stream."""
    return client.keys.inbox(client.group, stream) if client.settings.inboxes else stream


async def _own_group(client: BusClient, stream: str) -> None:
    """Make sure the bot's group exists on ``stream`` (at its end if new). A bot's Redis user
    may not create groups: it asks the manager through its observer and waits, bounded."""
    deadline = time.monotonic() + GROUP_WAIT
    waits = REDIS_RETRY.waits()
    while True:
        try:
            await ensure_group(client.streams, _group_key(client, stream), client.group, "$")
            return
        except GroupMissingError:
            if client.observer is None or time.monotonic() > deadline:
                raise
            client.observer.groups_missing([stream], "$")
        await asyncio.sleep(next(waits))


async def _position(client: BusClient, stream: str) -> str:
    """The group's last delivered id on ``stream``; the group is created at the end if new."""
    await _own_group(client, stream)
    groups: Any = await client.streams.xinfo_groups(_group_key(client, stream))
    return next(str(g["last-delivered-id"]) for g in groups if g["name"] == client.group)


async def catch_up(
    client: BusClient,
    patterns: list[str],
    handler: Callable[[Event], Awaitable[object]],
    since: datetime | str,
) -> int:
    """See :meth:`BusClient.catch_up`."""
    compiled = [Pattern(p) for p in patterns]
    streams = sorted(
        {client.keys.stream(s) for p in compiled for s in client.router.streams_for(p)}
    )
    store = await client.archive()
    handled = 0
    for stream in streams:
        until = await _position(client, stream)
        if until == "0-0":
            continue  # the group has seen nothing of this stream: nothing to catch up on
        name = client.keys.stream_name(stream)
        routed = [p.text for p in compiled if name in client.router.streams_for(p)]
        async for event in replay(
            client.replays, client.keys, client.router, routed, since, until, store=store
        ):
            if event.stream == stream:
                await handler(event)
                handled += 1
    return handled
