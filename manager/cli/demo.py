"""``multibot demo``: the example bots coordinating on the bus, every event printed.

It runs the example bots as the manager runs them, one ``python -m bots.runtime`` process
each (:mod:`manager.cli.demo_bots`), so the command line never imports bot code.
Simulated users write to the chat bots, the "system" now and then asks for load to be
taken off the busiest bot, and an observer prints one line per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import click

from bus import BusClient, Event, EventType
from bus.settings import BusSettings, ConsumerSettings
from manager.cli.demo_bots import BotExitedError, DemoBots
from manager.cli.options import count_option, rate_option, redis_url_option, seconds_option
from manager.cli.output import shorten
from manager.cli.redis_access import DEFAULT_REDIS_URL, bus_settings, run
from manager.embedded.redis_server import RedisServer
from manager.errors import EmbeddedServiceError

#: The bots the demo runs: bot id and entry point, as a bot's config will name them.
DEMO_BOTS: tuple[tuple[str, str], ...] = (
    ("greeter", "bots.chatbot:main"),
    ("matcher", "bots.chatbot:main"),
    ("shared-users", "bots.shared_users:main"),
)
#: The bots simulated users write to.
CHAT_BOTS = ("greeter", "matcher")
#: Key prefix of the demo: apart from a deployment's (``multibot``) on a shared Redis.
DEMO_NAMESPACE = "multibot-demo"
#: Every this many user messages, the system asks for load to be taken off the busiest bot.
BALANCE_EVERY = 12
_PHRASES = ("hi!", "anyone there?", "I'd like to meet someone", "any matches?", "thanks, bye")


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        return f'"{value}"'
    return str(value)


def describe(event: Event) -> str:
    """One readable line for an event: local time, type, source and data."""
    when = event.timestamp.astimezone().strftime("%H:%M:%S.%f")[:-3]
    data = " ".join(f"{key}={_value(value)}" for key, value in event.data.items())
    return f"{when}  {event.type:<30}  {event.source:<12}  {shorten(data, 120)}"


@contextlib.asynccontextmanager
async def _private_redis(echo: Callable[[str], None]) -> AsyncIterator[str]:
    """A private redis-server in a temporary directory; its URL. Stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix="multibot-demo-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendfsync="no")
        await server.start()
        try:
            echo(f"started a private {server.binary} at {server.url}")
            yield server.url
        finally:
            await server.stop()


async def _simulate(
    users_bus: BusClient, system: BusClient, users: int, rate: float, rng: random.Random
) -> None:
    """Users writing to random chat bots, about ``rate`` messages a second in all."""
    names = [f"user-{n}" for n in range(1, users + 1)]
    sent: Counter[str] = Counter()
    for n in itertools.count(1):
        user, bot, text = rng.choice(names), rng.choice(CHAT_BOTS), rng.choice(_PHRASES)
        data = {"user_id": user, "bot_id": bot, "text": text}
        await users_bus.publish(EventType.MESSAGE_RECEIVED, data, key=user)
        sent[bot] += 1
        if n % BALANCE_EVERY == 0:  # what the manager's load watch will publish
            busiest, count = sent.most_common(1)[0]
            need = {"reason": f"{busiest} had {count} messages", "bot_id": busiest}
            await system.publish(EventType.LOAD_BALANCE_REQUIRED, need)
        await asyncio.sleep(rng.uniform(0.5, 1.5) / rate)  # pacing, not waiting on a state


async def run_demo(
    redis_url: str | None,
    duration: float,
    users: int,
    echo: Callable[[str], None],
    *,
    seed: int | None = None,
    rate: float = 3.0,
    namespace: str = DEMO_NAMESPACE,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the demo bots, simulated users, and an observer passing one line per event to echo.

    With no ``redis_url`` a private redis-server runs for the demo's length. The demo lasts
    ``duration`` seconds, or with 0 until ``stop`` is set; then the clients stop (in-flight
    handlers finish) and the private server with them. Returns how many events were shown.
    """
    stop = stop or asyncio.Event()
    shown = 0

    async def show(event: Event) -> None:
        nonlocal shown
        shown += 1
        echo(describe(event))

    async with contextlib.AsyncExitStack() as stack:
        if redis_url is None:
            redis_url = await stack.enter_async_context(_private_redis(echo))
        settings = BusSettings(redis_url=redis_url, namespace=namespace)
        bots = DemoBots(DEMO_BOTS, settings)
        observer, users_bus, system = await _clients(stack, settings)
        observer.subscribe("#", show)
        await bots.start()
        stack.push_async_callback(bots.stop)
        try:
            async with asyncio.TaskGroup() as tg:
                watching = tg.create_task(bots.watch())
                tg.create_task(observer.run())
                await asyncio.gather(observer.wait_ready(), bots.ready(users_bus.redis))
                names = ", ".join(bot_id for bot_id, _ in DEMO_BOTS)
                echo(f"bots {names} are running; {users} simulated users write to them")
                simulation = tg.create_task(
                    _simulate(users_bus, system, users, rate, random.Random(seed))
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), duration or None)
                simulation.cancel()  # publish re-raises a cancel redis-py swallowed
                watching.cancel()
                await asyncio.gather(bots.stop(), observer.stop(timeout=5))
        except ExceptionGroup as failed:
            # The first failure (Redis gone, a bot crashed) ended the rest: report that one.
            raise failed.exceptions[0] from failed
    return shown


async def _clients(
    stack: contextlib.AsyncExitStack, settings: BusSettings
) -> tuple[BusClient, BusClient, BusClient]:
    """The observer's, the simulated users' and the system's bus clients, connected (and
    closed by ``stack``); fails fast, after the client's bounded retries, on a wrong URL
    (consumers would back off and retry forever, as long-running loops should)."""
    # One worker: the observer prints events in the order it reads them.
    in_order = settings.model_copy(update={"consumer": ConsumerSettings(concurrency=1)})
    observer = BusClient("demo-observer", settings=in_order)
    users_bus = BusClient("demo-users", settings=settings)
    system = BusClient("system", settings=settings)  # what the manager will publish
    for client in (observer, users_bus, system):
        await client.connect()
        stack.push_async_callback(client.close)
    await users_bus.redis.ping()
    return observer, users_bus, system


async def _until_signal(redis_url: str | None, duration: float, **options: Any) -> int:
    """``run_demo`` that Ctrl-C (SIGINT) and SIGTERM stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        return await run_demo(redis_url, duration, echo=click.echo, stop=stop, **options)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@click.command("demo")
@redis_url_option(
    show_envvar=True,
    metavar="URL",
    help="Redis to run on. Without it the demo starts a private redis-server for its length.",
)
@click.option(
    "--namespace",
    default=DEMO_NAMESPACE,
    show_default=True,
    help="Key prefix of the demo's streams and keys, apart from a deployment's.",
)
@seconds_option(
    "--duration",
    default=0,
    show_default=False,
    metavar="SECONDS",
    help="Stop after this many seconds. Default: 0, run until Ctrl-C.",
)
@count_option("--users", default=3, metavar="N", help="Simulated users.")
@rate_option(
    default=3.0,
    minimum=0.1,
    maximum=1000,
    help="Messages per second the users send, all together.",
)
@click.option("--seed", type=int, help="Seed of the users' random choices, for a repeatable run.")
def demo(
    *,
    redis_url: str | None,
    namespace: str,
    duration: float,
    users: int,
    rate: float,
    seed: int | None,
) -> None:
    """Run the example bots and print every event on the bus as it happens.

    Simulated users write to greeter and matcher, which answer. shared-users notices a user
    writing to both and announces it; the two bots agree that the smaller id (greeter) is
    the user's primary, and matcher hands that user's messages over to greeter from then
    on. Every few messages the system asks for load to be taken off the busiest bot, and
    the other one offers help.
    """
    settings = bus_settings(redis_url or DEFAULT_REDIS_URL, namespace)  # checks both options
    options = {"users": users, "rate": rate, "seed": seed, "namespace": namespace}
    try:
        shown = run(settings, _until_signal(redis_url, duration, **options))
    except (EmbeddedServiceError, BotExitedError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"demo stopped after {shown} events")
