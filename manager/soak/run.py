"""Running a soak: the manager, the load, the fault schedule, then reconciliation.

A run works in a temporary directory (the manager's data under ``data/``, the records of
the soak bots under ``handled/``, the load's under ``load/``). The faults are spread over
the duration, one after the other, each at least once: the run is cut into equal slots,
one per injection, after a short warm-up. Then the load stops, the run waits (bounded)
until every group and the archiver have caught up, collects what each party did, and
reconciles it by event id (:mod:`manager.soak.summary`). The directory is removed unless
asked to keep it or the run failed (the report names it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from bus import BusClient
from bus.connection import connect
from bus.keys import Keys
from bus.routing import DEFAULT_ROUTES, DEFAULT_STREAM, Router
from bus.settings import BusSettings
from manager.config import DEFAULT_CONFIG_PATH, load_config
from manager.embedded.child_process import child_setup
from manager.errors import ManagerError
from manager.soak.bot import TICK
from manager.soak.faults import INJECT, FaultContext
from manager.soak.load import URL_ENV
from manager.soak.observe import MemorySampler, caught_up
from manager.soak.process import ManagerKeeper
from manager.soak.reconcile import Window
from manager.soak.report import SoakReport
from manager.soak.setup import SOAK_BOTS, soak_groups, write_config
from manager.soak.summary import Evidence, summarize

log = structlog.get_logger("manager.soak")

WARM_UP = 3.0  # seconds of plain load before the first fault
EMBEDDED_ONLY = frozenset({"redis-kill", "pg-stop"})
LOAD_STOP_TIMEOUT = 60.0


class SoakError(ManagerError):
    """The soak could not run (the message says what to do)."""


@dataclass(frozen=True)
class SoakOptions:
    """What a run does."""

    duration: float = 120.0
    rate: float = 1000.0
    faults: tuple[str, ...] = ()
    hold: float = 3.0
    #: Seconds the archive is kept failing (pg-diskfull) at the start of the fault schedule.
    pg_down: float | None = None
    loaders: int = 1
    config: Path = DEFAULT_CONFIG_PATH
    keep: bool = False
    catch_up_timeout: float = 180.0


def schedule(options: SoakOptions) -> list[tuple[float, str, float]]:
    """The injections as (seconds into the run, fault, hold): one slot each, in order."""
    plan = [(f, options.hold) for f in options.faults]
    if options.pg_down:
        plan.insert(0, ("pg-diskfull", options.pg_down))
    if not plan:
        return []
    span = max(options.duration - WARM_UP, 0.0)
    weights = [max(hold, 1.0) + 6.0 for _, hold in plan]  # a fault's hold plus its recovery
    at, out = WARM_UP, []
    for (fault, hold), weight in zip(plan, weights, strict=True):
        out.append((round(at, 3), fault, hold))
        at += span * weight / sum(weights)
    return out


async def run_soak(options: SoakOptions, echo: Callable[[str], None]) -> SoakReport:
    """Run the soak ``options`` describe; its report. :class:`SoakError` if it cannot run."""
    settings = load_config(options.config)
    embedded_faults = EMBEDDED_ONLY & set(options.faults)
    if embedded_faults and (settings.redis_url or settings.postgres_dsn):
        raise SoakError(
            f"faults {', '.join(sorted(embedded_faults))} act on the embedded Redis and "
            f"PostgreSQL, but {options.config} configures its own: drop them from --faults"
        )
    work = Path(tempfile.mkdtemp(prefix="mb-soak-"))
    os.chmod(work, 0o711)  # as root, the embedded PostgreSQL runs as another user
    (work / "handled").mkdir()
    (work / "load").mkdir()
    keep = options.keep
    try:
        config = write_config(work, work / "handled", base=options.config)
        report = await _run(options, work, config, echo)
        keep = keep or not report.ok
    except BaseException:
        keep = True
        echo(f"soak files kept in {work}")
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report.model_copy(update={"work_dir": str(work) if keep else None})


async def _run(
    options: SoakOptions, work: Path, config: Path, echo: Callable[[str], None]
) -> SoakReport:
    settings = load_config(config)
    keeper = ManagerKeeper(work, config)
    echo("starting the manager ...")
    ready = await keeper.start()
    echo(f"READY after {ready:.1f}s")
    found = await keeper.connection()
    bus_settings = BusSettings(redis_url=found["redis_url"], namespace=found["namespace"])
    keys = Keys(bus_settings.namespace)
    router = Router(
        settings.bus.routes or DEFAULT_ROUTES, settings.bus.default_stream or DEFAULT_STREAM
    )
    stream = keys.stream(router.route(TICK))
    redis = connect(bus_settings, client_name="multibot-soak")
    sampler = MemorySampler(redis)
    started = time.time()
    try:
        async with (
            BusClient("soak-faults", settings=bus_settings) as publisher,
            asyncio.TaskGroup() as tg,
        ):
            background = [tg.create_task(sampler.run()), tg.create_task(keeper.watch())]
            ctx = FaultContext(
                keeper, redis, found.get("postgres_dsn"), stream, keys, publisher, sampler,
                tuple(b for b, _, _ in SOAK_BOTS),
            )  # fmt: skip
            loaders = await _start_load(options, work, found["redis_url"], bus_settings.namespace)
            faults = ", ".join(options.faults) or "none"
            echo(f"load: {options.rate:g}/s for {options.duration:g}s; faults: {faults}")
            windows, errors = await _inject_all(options, ctx, started, echo)
            await asyncio.sleep(max(0.0, started + options.duration - time.time()))
            await _stop_load(loaders)
            echo("load stopped; waiting for every group and the archiver to catch up ...")
            backlog = await caught_up(redis, stream, keys, soak_groups(), options.catch_up_timeout)
            evidence = Evidence(
                started=started, ended=time.time(), work=work, redis=redis,
                dsn=(await keeper.connection()).get("postgres_dsn"), dlq=keys.dead_letters(),
                windows=windows, kills=ctx.kills, redis_kills=ctx.redis_kills, hangs=ctx.hangs,
                hostile=ctx.hostile,
                sampler=sampler, keeper=keeper, backlog=backlog, fault_errors=errors,
            )  # fmt: skip
            report = await summarize(options.duration, options.rate, evidence)
            for task in background:
                task.cancel()
    finally:
        await redis.aclose()
        await keeper.stop()
    return report


async def _inject_all(
    options: SoakOptions, ctx: FaultContext, started: float, echo: Callable[[str], None]
) -> tuple[list[Window], list[str]]:
    windows: list[Window] = []
    errors: list[str] = []
    for offset, fault, hold in schedule(options):
        await asyncio.sleep(max(0.0, started + offset - time.time()))
        echo(f"  {time.time() - started:6.1f}s  {fault} (hold {hold:g}s)")
        begin = time.time()
        try:
            end = await INJECT[fault](ctx, hold)
        except ManagerError as exc:  # the manager did not come back: nothing more to learn
            raise SoakError(f"{fault}: {exc}") from exc
        except Exception as exc:
            log.warning("soak: fault failed", fault=fault, error=str(exc))
            errors.append(f"{fault} at {begin - started:.1f}s: {type(exc).__name__}: {exc}")
            end = time.time()
        windows.append(Window(fault, begin, end))
    return windows, errors


async def _start_load(
    options: SoakOptions, work: Path, url: str, namespace: str
) -> list[asyncio.subprocess.Process]:
    env = {**os.environ, URL_ENV: url}
    rate = options.rate / options.loaders
    loaders = []
    for n in range(options.loaders):
        out = work / "load" / f"load-{n}.out"
        with (work / "load" / f"load-{n}.log").open("ab") as log_file:
            loaders.append(
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "manager.soak.load", str(out), str(rate), namespace),
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    preexec_fn=child_setup(),  # they die with the soak
                )
            )
    return loaders


async def _stop_load(loaders: list[asyncio.subprocess.Process]) -> None:
    for process in loaders:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    for process in loaders:
        try:
            await asyncio.wait_for(process.wait(), LOAD_STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
        if process.returncode != 0:
            raise SoakError(f"a load process exited with code {process.returncode}: see its log")
