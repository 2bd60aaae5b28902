"""A benchmark worker process: runs its producers and consumers through one phase.

A worker runs the roles the parent gave it (:class:`~manager.bench.options.Roles`) in one
uvloop event loop: bus clients (:mod:`manager.bench.bus_roles`) or the bare redis-py
baseline (:mod:`manager.bench.raw_roles`). Only the phase's own module is imported, so a
baseline worker's RSS does not include the bus.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from multiprocessing.connection import Connection
from typing import Any

import structlog

from manager.bench.options import BenchError, BenchOptions, Mode, WorkerSpec
from manager.bench.recording import Recorder, Tally, WorkerResult, expect, receive

log = structlog.get_logger("manager.bench")

#: Publish one send (``batch`` events from ``seq`` on) stamped with publish-call time ``t``.
Send = Callable[[int, float], Awaitable[object]]
#: Runs a worker's consumers while the block is open.
Consumers = Callable[[WorkerSpec, Recorder], AbstractAsyncContextManager[None]]
#: Connects a worker's producers and yields ``(producer index, send)`` pairs.
Producers = Callable[[WorkerSpec], AbstractAsyncContextManager[list[tuple[int, Send]]]]
Kit = tuple[Consumers, Producers, tuple[type[Exception], ...]]


def _kit(mode: Mode) -> Kit:
    # Imported here, not at the top: a baseline worker must not load the bus (its imports
    # alone are ~11 MiB of the RSS being measured).
    if mode == "bus":
        from manager.bench import bus_roles  # noqa: PLC0415 - see above

        return bus_roles.consumers, bus_roles.producers, bus_roles.SEND_ERRORS
    from manager.bench import raw_roles  # noqa: PLC0415 - see above

    return raw_roles.consumers, raw_roles.producers, raw_roles.SEND_ERRORS


async def run_worker(spec: WorkerSpec, conn: Connection, progress: memoryview) -> None:
    """Run ``spec``'s roles through one phase, talking to the parent on ``conn``.

    Sends ``ready`` once connected (consumers reading), publishes from the ``go`` time,
    sends ``published``, keeps consuming until ``stop``, then sends its ``result``.
    """
    consumers, producers, errors = _kit(spec.mode)
    recorder = Recorder(progress, spec.index)
    tally = Tally()
    async with consumers(spec, recorder), producers(spec) as sends:
        # As a bot's runtime does once ready (and the baseline alike): what start-up made
        # lives on, out of the full collections, whose pauses would land in the latencies.
        gc.freeze()
        conn.send(("ready", None))
        t0: float = await expect(conn, "go")
        recorder.measure_from = t0 + spec.options.warmup
        producing = asyncio.gather(
            *(
                _pace(send, index, t0=t0, opts=spec.options, tally=tally, errors=errors)
                for index, send in sends
            )
        )
        await _unless_parent_leaves(producing, conn)
        conn.send(("published", tally))
        await expect(conn, "stop")
    conn.send(("result", WorkerResult.build(spec.index, spec.label, tally, recorder)))


async def _unless_parent_leaves(work: asyncio.Future[Any], conn: Connection) -> None:
    """Await ``work``, cancelling it if the parent closes ``conn`` meanwhile (it sends
    nothing until it got our ``published``, so anything arriving now is its exit)."""
    parent = asyncio.ensure_future(receive(conn))
    try:
        await asyncio.wait({work, parent}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, parent):
            task.cancel()
        await asyncio.gather(work, parent, return_exceptions=True)
    if parent.done() and not parent.cancelled():
        kind, _ = parent.result()  # raises EOFError when the parent is gone
        raise BenchError(f"the bench parent sent {kind!r} while we were publishing")
    work.result()


async def _pace(
    send: Send,
    index: int,
    *,
    t0: float,
    opts: BenchOptions,
    tally: Tally,
    errors: tuple[type[Exception], ...],
) -> None:
    """Publish from ``t0`` for warmup + duration, at the offered rate or flat out.

    Sends are scheduled on an absolute timeline (``next_at += interval``): a slow send is
    followed by immediate ones, so the offered rate holds (no coordinated omission).
    Producers are staggered across one interval so the total rate is smooth. A send that
    raises one of ``errors`` is counted as not confirmed, and publishing goes on.
    """
    loop = asyncio.get_running_loop()
    start = loop.time() + (t0 - time.time())
    end = start + opts.warmup + opts.duration
    measure_from = t0 + opts.warmup
    interval, batch = opts.send_interval, opts.batch_size
    next_at = start + index * interval / opts.producers
    await asyncio.sleep(max(0.0, start - loop.time()))
    seq = failures = 0
    while loop.time() < end:  # also on the clock: sends may be slow (Redis retries)
        if interval:
            if next_at >= end:
                break
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at += interval
        t = time.time()
        try:
            await send(seq, t)
        except errors as exc:
            failures += 1
            if failures == 1:
                log.warning("bench publish failed", producer=index, seq=seq, error=str(exc))
            tally.failed.extend((index, s) for s in range(seq, seq + batch))
        else:
            if t >= measure_from:
                tally.publish_latencies.append(time.time() - t)
                tally.measured += batch
                tally.first_sent = min(tally.first_sent, t)
                tally.last_sent = max(tally.last_sent, t)
        seq += batch
    tally.attempted[index] = seq
    if failures:
        log.warning("bench publishes failed", producer=index, failures=failures, sends=seq)
