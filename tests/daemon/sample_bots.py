"""Bots the daemon tests run under a real manager: each misbehaves in one way on purpose."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from bus import BusClient, Event


async def steady(bus: BusClient) -> None:
    """Consumes ``test.*`` and does nothing else."""

    async def handle(event: Event) -> None:
        return None

    bus.subscribe("test.#", handle)
    await bus.run()


async def crasher(bus: BusClient) -> None:
    """Exits with code 3 as soon as it starts."""
    await asyncio.sleep(0.05)
    os._exit(3)


async def hanger(bus: BusClient) -> None:
    """Blocks its event loop (so its heartbeats stop) on ``test.hang``."""

    async def hang(event: Event) -> None:
        time.sleep(3600)  # noqa: ASYNC251 - blocking the loop is the point

    bus.subscribe("test.hang", hang)
    await bus.run()


async def hog(bus: BusClient) -> None:
    """Holds about 160 MB, then consumes."""
    ballast = bytearray(160 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it counts in RSS

    async def handle(event: Event) -> None:
        return None

    bus.subscribe("test.#", handle)
    await bus.run()
    del ballast


async def poisoned(bus: BusClient) -> None:
    """Dies (exit 9) on ``test.poison``; handles ``test.ok`` into its state list."""

    async def poison(event: Event) -> None:
        os._exit(9)

    async def ok(event: Event) -> None:
        await bus.redis.rpush(bus.keys.bot_state(bus.bot_id, "handled"), event.id)

    bus.subscribe("test.poison", poison)
    bus.subscribe("test.ok", ok)
    await bus.run()


async def leader(bus: BusClient) -> None:
    """While active, appends ``<instance>`` to its state list every 20 ms."""
    key = bus.keys.bot_state(bus.bot_id, "ticks")
    while True:
        await bus.redis.rpush(key, str(bus.instance))
        await asyncio.sleep(0.02)


async def prober(bus: BusClient) -> None:
    """Tries what a bot must not do and publishes what Redis answered."""
    results: dict[str, str] = {}
    attempts = {
        "other_namespace_get": ("GET", "other:bot:x:secret"),
        "other_namespace_stream": ("XRANGE", "other:stream:{user}", "-", "+"),
        "other_bot_state": ("GET", bus.keys.bot_state("someone-else", "x")),
        "flushall": ("FLUSHALL",),
        "config_get": ("CONFIG", "GET", "requirepass"),
        "acl_list": ("ACL", "LIST"),
        "keys": ("KEYS", "*"),
        "shutdown": ("SHUTDOWN", "NOSAVE"),
        "own_state": ("SET", bus.keys.bot_state(bus.bot_id, "x"), "1"),
    }
    for name, command in attempts.items():
        try:
            await bus.redis.execute_command(*command)  # type: ignore[no-untyped-call]
        except Exception as exc:
            results[name] = f"denied: {type(exc).__name__}: {exc}"
        else:
            results[name] = "allowed"
    await bus.publish("test.acl.result", results)
    await bus.run()


async def chatty(bus: BusClient) -> None:
    """Writes 2 MB to stdout, one 100 kB line to stderr, then a marker line, then runs."""
    import sys

    for i in range(20_000):
        sys.stdout.write(f"line {i} " + "x" * 90 + "\n")
    sys.stdout.flush()
    sys.stderr.write("y" * 100_000 + "\n")
    sys.stderr.write("chatty done\n")
    sys.stderr.flush()
    await bus.run()


async def slowpoke(bus: BusClient) -> None:
    """Takes ``data["sleep"]`` seconds per ``test.slow`` event, then records who handled it."""

    async def slow(event: Event) -> None:
        await asyncio.sleep(float(event.data["sleep"]))
        handled = bus.keys.bot_state(bus.bot_id, "handled")
        await bus.redis.rpush(handled, f"{bus.instance}:{event.id}")

    bus.subscribe("test.slow", slow)
    await bus.run()


async def idle(bus: BusClient) -> None:
    """Never reads: its declared group only fills up."""
    await asyncio.Event().wait()


async def historian(bus: BusClient) -> None:
    """Catches up on every ``test.*`` event since the beginning, then goes on live."""
    seen = bus.keys.bot_state(bus.bot_id, "seen")

    async def record(event: Event) -> None:
        await bus.redis.rpush(seen, event.id)

    await bus.catch_up("test.#", record, since="0")
    bus.subscribe("test.#", record)
    await bus.run()


async def emitter(bus: BusClient) -> None:
    """Publishes ``test.ok`` events, 10 ms apart, until 600 were confirmed, printing
    ``confirmed <id>`` for each; an unconfirmed publish is counted, not retried (its event
    may or may not exist). Then idles."""
    confirmed = 0
    while confirmed < 600:
        try:
            event_id = await bus.publish("test.ok", {"n": confirmed})
        except Exception as exc:
            _say(f"unconfirmed {type(exc).__name__}")
            await asyncio.sleep(0.05)
            continue
        confirmed += 1
        _say(f"confirmed {event_id}")
        await asyncio.sleep(0.01)
    await bus.run()


async def collector(bus: BusClient) -> None:
    """Adds the id of every ``test.ok`` event to its state set ``handled``."""

    async def ok(event: Event) -> None:
        await bus.redis.sadd(bus.keys.bot_state(bus.bot_id, "handled"), event.id)

    bus.subscribe("test.ok", ok)
    await bus.run()


def _say(line: str) -> None:
    """A line on stdout, which the manager logs with the bot's id."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
