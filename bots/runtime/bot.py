"""Running one bot process: the client, heartbeats, the lease, signals, and the bot's main."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from bots.runtime.status import StatusChannel
from bus import BusClient
from bus.subscription import Allowed
from bus.supervision import EXIT_LEASE_LOST, PlainRuntimeSpec, Status, StatusLine

if TYPE_CHECKING:
    from bus.lease import Lease

log = structlog.get_logger("bots.runtime")
#: Seconds after which a bot that has not subscribed counts as ready (it only publishes).
READY_GRACE = 1.0
BotMain = Callable[[BusClient], Coroutine[Any, Any, None]]


async def run_bot(
    spec: PlainRuntimeSpec, bot_main: BotMain, *, commands: bytes | None = None
) -> int:
    """Run the bot until it returns or a signal stops it; the process exit code.

    With ``commands`` (not None), stdin carries the manager's commands, one per line,
    ``commands`` being what was already read of them: ``reclaim`` (take over a dead
    replica's entries now) and ``stop``. The end of stdin means the manager is gone: stop.
    """
    status = StatusChannel(spec.status_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    allowed = Allowed(spec.subscriptions) if spec.subscriptions else None
    bus = BusClient(
        spec.bot_id, settings=spec.bus, instance=spec.instance, observer=status, allowed=allowed
    )
    async with bus, asyncio.TaskGroup() as tg:
        background = [
            tg.create_task(status.heartbeats(spec.heartbeat_interval)),
            tg.create_task(status.metrics_reports(bus.metrics, spec.metrics_interval)),
        ]
        if commands is not None:
            background.append(tg.create_task(_read_commands(commands, bus, stop)))
        try:
            return await _serve(spec, bus, bot_main, status=status, stop=stop, tg=tg)
        finally:
            status.send_metrics(bus.metrics)  # the last counts, acks of the stop included
            for task in background:
                task.cancel()


async def _read_commands(already: bytes, bus: BusClient, stop: asyncio.Event) -> None:
    """Act on the manager's commands from stdin until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    reader.feed_data(already)
    # Wrapping an fd does no blocking I/O; the transport closes the wrapper.
    stdin = open(0, "rb", 0, closefd=False)  # noqa: SIM115, ASYNC230
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    while line := await reader.readline():
        log.debug("command from the manager", command=line.strip().decode(errors="replace"))
        match line.strip():
            case b"reclaim":
                bus.reclaim_now()
            case b"stop":
                stop.set()
            case other:
                log.warning(
                    "unknown command from the manager", command=other.decode(errors="replace")
                )
    log.warning("stdin closed: the manager is gone; stopping")
    stop.set()


async def _serve(
    spec: PlainRuntimeSpec,
    bus: BusClient,
    bot_main: BotMain,
    *,
    status: StatusChannel,
    stop: asyncio.Event,
    tg: asyncio.TaskGroup,
) -> int:
    keeper: asyncio.Task[None] | None = None
    lease: Lease | None = None
    if spec.lease_ttl is not None:
        from bus.lease import Lease  # noqa: PLC0415 - only an active/standby bot holds one

        lease = Lease(bus.redis, bus.keys, spec.bot_id, str(spec.instance), spec.lease_ttl)
        status.send(StatusLine(Status.STANDBY))
        if not await _acquire(lease, stop, status):
            return 0
        status.send(StatusLine(Status.ACTIVE, token=lease.token))
        log.info("lease taken: this replica is active", token=lease.token)
        # Fencing: no handler starts once the lease may have expired (say the event loop
        # stalled past the TTL, so the keeper could not renew it in time): the standby may
        # be active by then. The entry stays pending; the process exits at once.
        held, margin = lease, _margin(lease)
        bus.set_fence(
            lambda: held.token is not None and time.monotonic() < held.valid_until - margin,
            _lease_lost,
        )
        keeper = tg.create_task(_keep(lease))
    bot = tg.create_task(bot_main(bus))
    ready = tg.create_task(_report_ready(bus, status))
    stopping = tg.create_task(_first(stop.wait(), status.closed.wait()))
    try:
        await asyncio.wait({bot, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not bot.done():
            log.info("stopping: in-flight events get the stop timeout", timeout=spec.stop_timeout)
            deadline = asyncio.get_running_loop().time() + spec.stop_timeout
            await bus.stop(timeout=spec.stop_timeout)
            left = max(0.1, deadline - asyncio.get_running_loop().time())
            try:
                await asyncio.wait_for(asyncio.shield(bot), left)
            except TimeoutError:
                log.warning("the bot's main did not return after the bus stopped; cancelling it")
                bot.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bot
        return 0
    except Exception:
        log.exception("the bot's main raised")
        return 1
    finally:
        for task in (ready, stopping, keeper):
            if task is not None:
                task.cancel()
        if lease is not None:
            with contextlib.suppress(Exception):
                await lease.release()


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _report_ready(bus: BusClient, status: StatusChannel) -> None:
    """Say ``ready`` once the bot's consumer reads (the bot called ``bus.run()``), or once
    its main has run for :data:`READY_GRACE` without subscribing (a bot that only publishes).
    """
    try:
        await bus.wait_ready(timeout=READY_GRACE)
    except TimeoutError:
        while bus.subscriptions:  # it subscribed: ready when its consumer reads
            try:
                await bus.wait_ready(timeout=3600)
                break
            except TimeoutError:
                continue
    gc.freeze()  # what start-up made lives as long as the bot: out of the full collections
    status.send(StatusLine(Status.READY))


async def _acquire(lease: Lease, stop: asyncio.Event, status: StatusChannel) -> bool:
    """Wait for the lease as a standby; False if told to stop first."""
    poll = max(0.05, lease.ttl / 10)
    while not stop.is_set() and not status.closed.is_set():
        try:
            if await lease.try_acquire():
                return True
        except Exception as exc:  # Redis away: keep waiting, a standby has nothing to lose
            log.warning("cannot reach Redis for the lease; retrying", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
    return False


def _margin(lease: Lease) -> float:
    """Seconds before its own deadline a holder stops acting (a handler starting right at
    the deadline would still run after it)."""
    return min(0.5, lease.ttl / 10)


def _lease_lost() -> None:
    log.error("lease expired before a handler could start: exiting so a standby takes over")
    os._exit(EXIT_LEASE_LOST)


async def _keep(lease: Lease) -> None:
    """Renew the lease every third of its TTL; exit the process the moment it is lost.

    Exiting (not a graceful stop) is what guarantees never two actives: the process stops
    acting before its own deadline, and the standby takes over only after Redis expired it.
    """
    margin = _margin(lease)
    while True:
        await asyncio.sleep(lease.ttl / 3)
        try:
            if await lease.renew():
                continue
            reason = "another replica holds it"
        except Exception as exc:
            if time.monotonic() < lease.valid_until - margin - lease.ttl / 3:
                log.warning("lease renewal failed; retrying", error=str(exc))
                continue
            reason = f"cannot renew it in time: {exc}"
        log.error("lease lost: exiting so a standby can take over", reason=reason)
        os._exit(EXIT_LEASE_LOST)
