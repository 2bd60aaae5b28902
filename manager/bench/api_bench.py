"""``multibot bench-api``: events/s accepted by ``POST /v1/events``, its latency, the RSS,
side by side with what the bus itself publishes on the same Redis.

It runs ``multibot start`` on the checkout's default config (embedded Redis and PostgreSQL,
the example bots, the API on a free port) in a temporary data directory, as
``multibot bench-manager`` does, with the per-token rate limit raised out of the way
(``api.rate_limit`` and ``api.rate_burst``, :data:`RAISED_RATE`): what is measured is the
API, not the limiter. For each batch size in turn, first the yardstick: a second process
(:mod:`manager.bench.publish_load`) publishes the same events with the bus client on the
manager's Redis, ``concurrency`` calls in flight; then the API: a second process
(:mod:`manager.bench.http_load`) posts them with the admin token (handed over on its stdin,
never its command line) over ``concurrency`` keep-alive connections, while the manager's
RSS is sampled; the manager's RSS is also taken idle, before the first load. The ratios of
the two, and the API's p99 against its p95, are what :data:`TARGETS` holds them to.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from manager.api.auth import ADMIN_TOKEN_FILE
from manager.bench.manager_bench import ManagerExitedError, ManagerRun
from manager.control import ControlError
from manager.control_client import call
from manager.embedded.child_process import child_setup
from manager.errors import ManagerError

#: ``api.rate_limit`` (requests/s) and ``api.rate_burst`` of the measured manager.
RAISED_RATE = 1_000_000
WARMUP = 1.0  # seconds of load before each measurement
SETTLE = 3.0  # seconds idle after READY before the idle RSS is taken
SAMPLE = 0.05  # seconds between RSS samples under load
#: What the API is held to: its events/s at least this share of the bus's at the same batch
#: size (1: one ``publish`` per call; more: ``publish_many``), its p99 at most this many p95s.
TARGETS = {"single_share": 0.5, "batch_share": 0.7, "p99_over_p95": 3.0}
#: How the two sides are made comparable, for the report.
FAIRNESS = (
    "both sides: {concurrency} calls in flight, each awaited before the next, from one "
    "Python process on uvloop (the API's: the manager, its keep-alive connections loaded by "
    "a second process that shares the cores; the bus's: a client in a process of its own, "
    "publishing as the manager's own client does, straight to the streams with the "
    "backpressure check); the same events on the manager's Redis (embedded, AOF on) while "
    "the manager runs its bots and archiver; the bus first, then the API, {warmup:g} s "
    "warmup and {duration:g} s measured each. The API sends the events of the requests it "
    "answers in one loop turn in one pipeline; the bus sends each call as it comes"
)


async def run_api_bench(
    concurrency: int,
    duration: float,
    echo: Callable[[str], None],
    batches: Sequence[int] = (1, 100),
) -> dict[str, Any]:
    """Measure; the results as a JSON-able dict (``echo`` reports progress). When the
    manager fails, the error names its log, which is kept; else the run's files go."""
    work = Path(tempfile.mkdtemp(prefix="multibot-bench-api-"))
    os.chmod(work, 0o711)  # as root, the embedded PostgreSQL runs as another user
    limits = {
        "MULTIBOT_API__RATE_LIMIT": str(RAISED_RATE),
        "MULTIBOT_API__RATE_BURST": str(RAISED_RATE),
    }
    keep = False
    try:
        async with ManagerRun(work, env=limits) as manager:
            echo("starting the manager on the default config ...")
            ready = await manager.start()
            about = (await manager.status()).manager
            url, token = about.api, (manager.data_dir / ADMIN_TOKEN_FILE).read_text().strip()
            if not url:
                raise ManagerError("the measured manager serves no HTTP API (api.enabled is off)")
            process = psutil.Process(about.pid)
            redis = await call(manager.data_dir / "manager.sock", "connection", timeout=10)
            echo(f"READY after {ready:.2f}s, API at {url}; idling {SETTLE:g} s before measuring")
            await asyncio.sleep(SETTLE)
            idle = process.memory_info().rss
            runs: dict[str, Any] = {}
            bus: dict[str, Any] = {}
            peak = idle
            for batch in batches:
                what = "single events" if batch == 1 else f"batches of {batch}"
                echo(f"{what}, the bus: {concurrency} calls in flight, {WARMUP:g} s warmup, "
                     f"{duration:g} s ...")  # fmt: skip
                bus[str(batch)] = await run_publish_process(
                    redis["redis_url"], redis["namespace"],
                    batch=batch, concurrency=concurrency, duration=duration,
                )  # fmt: skip
                echo(f"{what}, the API: {concurrency} connections, {WARMUP:g} s warmup, "
                     f"{duration:g} s ...")  # fmt: skip
                run, run_peak = await _load(
                    process, url, token, batch=batch, concurrency=concurrency, duration=duration
                )
                runs[str(batch)] = run
                peak = max(peak, run_peak)
            after = process.memory_info().rss
            await manager.stop()
    except (ManagerExitedError, ControlError, TimeoutError, psutil.Error) as exc:
        keep = True
        raise ManagerError(f"the measured manager failed: {exc}; see {work}/manager.log") from exc
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "api": url,
        "concurrency": concurrency,
        "duration_s": duration,
        "warmup_s": WARMUP,
        "rate_limit_raised_to": {"rate_limit": RAISED_RATE, "rate_burst": RAISED_RATE},
        "batches": runs,
        "bus": bus,
        "against_bus": {b: against_bus(runs[b], bus[b]) for b in runs},
        "targets": TARGETS,
        "fairness": FAIRNESS.format(concurrency=concurrency, warmup=WARMUP, duration=duration),
        "manager_rss_bytes": {"idle": idle, "peak": peak, "after": after},
    }
    for line in comparison(result):
        echo(line)
    return result


def against_bus(api: dict[str, Any], bus: dict[str, Any]) -> dict[str, Any]:
    """The API's run against the bus's at the same batch size: the share of the bus's
    events/s it accepted, each side's p99 over its p95, and whether the targets are met."""
    share = api["events_per_s"] / bus["events_per_s"] if bus["events_per_s"] else None
    wanted = TARGETS["single_share" if api["batch"] == 1 else "batch_share"]
    tail = _tail(api)
    return {
        "events_share": None if share is None else round(share, 3),
        "events_share_target": wanted,
        "api_p99_over_p95": tail,
        "bus_p99_over_p95": _tail(bus),
        "met": share is not None
        and share >= wanted
        and tail is not None
        and tail <= TARGETS["p99_over_p95"],
    }


def _tail(run: dict[str, Any]) -> float | None:
    lat = run["latency_ms"]
    return round(lat["p99"] / lat["p95"], 2) if lat and lat["p95"] else None


def comparison(result: dict[str, Any]) -> list[str]:
    """The API against the bus, a line per batch size, and how they were made comparable."""
    lines = ["the API against the bus itself, side by side:"]
    limit = TARGETS["p99_over_p95"]
    for batch, versus in result["against_bus"].items():
        api, bus = result["batches"][batch], result["bus"][batch]
        what = "single events" if batch == "1" else f"batches of {batch}"
        alat = api["latency_ms"] or dict.fromkeys(("p95", "p99"), "-")
        blat = bus["latency_ms"] or dict.fromkeys(("p95", "p99"), "-")
        lines.append(
            f"  {what}: API {api['events_per_s']:,.0f} events/s, bus {bus['events_per_s']:,.0f}"
            f" -> {versus['events_share']} (target >= {versus['events_share_target']}); "
            f"API p95 {alat['p95']} ms p99 {alat['p99']} ms -> p99/p95 "
            f"{versus['api_p99_over_p95']} (target <= {limit:g}); bus p95 {blat['p95']} ms "
            f"p99 {blat['p99']} ms; {'met' if versus['met'] else 'NOT met'}"
        )
    lines.append(f"  ({result['fairness']})")
    return lines


async def _load(
    manager: psutil.Process, url: str, token: str, *, batch: int, concurrency: int, duration: float
) -> tuple[dict[str, Any], int]:
    """One run of the load process; its results (with the manager's peak RSS during it)
    and that peak."""
    peak = manager.memory_info().rss
    load = asyncio.ensure_future(
        run_load_process(
            url, token, pid=manager.pid, batch=batch, concurrency=concurrency, duration=duration
        )
    )
    try:
        while not load.done():  # the RSS sampled until the load process is done
            peak = max(peak, manager.memory_info().rss)
            await asyncio.wait((load,), timeout=SAMPLE)
        out = load.result()
    finally:  # cancelled, or the manager gone: the load process must not outlive this
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
    out["manager_cpu_percent"] = out.pop("server_cpu_percent")
    out["manager_rss_peak_bytes"] = peak
    return out, peak


async def run_load_process(
    url: str,
    token: str,
    *,
    batch: int,
    concurrency: int,
    duration: float,
    warmup: float = WARMUP,
    pid: int | None = None,
) -> dict[str, Any]:
    """Run :mod:`manager.bench.http_load` against ``url`` with ``token``; its results
    (with the CPU share of the server process ``pid``, if given).

    The token goes to the process on its stdin, never on its command line, where any
    local user could read it (``ps``) and where one starting with ``-`` would be taken for
    an option. :class:`ManagerError` if the process fails.
    """
    args = [
        "--url", url, "--batch", str(batch), "--concurrency", str(concurrency),
        "--duration", str(duration), "--warmup", str(warmup),
    ]  # fmt: skip
    args += ["--pid", str(pid)] if pid is not None else []
    secret = f"{token}\n"
    return await _run_child("http_load", ["--token-file", "-", *args], secret, warmup + duration)


async def run_publish_process(
    redis_url: str,
    namespace: str,
    *,
    batch: int,
    concurrency: int,
    duration: float,
    warmup: float = WARMUP,
) -> dict[str, Any]:
    """Run :mod:`manager.bench.publish_load` on ``redis_url`` (handed over on its stdin:
    the URL holds a password); its results. :class:`ManagerError` if the process fails."""
    args = [
        "--batch", str(batch), "--concurrency", str(concurrency),
        "--duration", str(duration), "--warmup", str(warmup),
    ]  # fmt: skip
    secret = f"{redis_url}\n{namespace}\n"
    return await _run_child("publish_load", args, secret, warmup + duration)


async def _run_child(module: str, args: list[str], stdin: str, runs: float) -> dict[str, Any]:
    """Run ``manager.bench.<module>`` with ``args`` and ``stdin``, for about ``runs``
    seconds; the JSON of its last line of output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"manager.bench.{module}", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=child_setup(),  # it dies with the bench
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), runs + 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        what = "load" if module == "http_load" else "publishing"
        raise ManagerError(
            f"the {what} process failed (exit {process.returncode}): "
            f"{stderr.decode(errors='replace').strip()[-2000:]}"
        )
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result
