"""``multibot bench-api``: events/s accepted by ``POST /v1/events``, its latency, the RSS.

It runs ``multibot start`` on the checkout's default config (embedded Redis and PostgreSQL,
the example bots, the API on a free port) in a temporary data directory, as
``multibot bench-manager`` does, with the per-token rate limit raised out of the way
(``api.rate_limit`` and ``api.rate_burst``, :data:`RAISED_RATE`): what is measured is the
API, not the limiter. For each batch size in turn, a second process
(:mod:`manager.bench.http_load`) posts events with the admin token over ``concurrency``
keep-alive connections, while the manager's RSS is sampled; the manager's RSS is also taken
idle, before the first load.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from manager.bench.manager_bench import ManagerRun
from manager.control import ControlError
from manager.errors import ManagerError

#: ``api.rate_limit`` (requests/s) and ``api.rate_burst`` of the measured manager.
RAISED_RATE = 1_000_000
WARMUP = 1.0  # seconds of load before each measurement
SETTLE = 3.0  # seconds idle after READY before the idle RSS is taken
SAMPLE = 0.05  # seconds between RSS samples under load


async def run_api_bench(
    concurrency: int,
    duration: float,
    echo: Callable[[str], None],
    batches: Sequence[int] = (1, 100),
) -> dict[str, Any]:
    """Measure; the results as a JSON-able dict (``echo`` reports progress)."""
    work = Path(tempfile.mkdtemp(prefix="multibot-bench-api-"))
    os.chmod(work, 0o711)  # as root, the embedded PostgreSQL runs as another user
    manager = ManagerRun(
        work,
        env={
            "MULTIBOT_API__RATE_LIMIT": str(RAISED_RATE),
            "MULTIBOT_API__RATE_BURST": str(RAISED_RATE),
        },
    )
    done = False
    try:
        echo("starting the manager on the default config ...")
        ready = await manager.start()
        about = (await manager.status())["manager"]
        url, token = about["api"], (manager.data_dir / ADMIN_TOKEN_FILE).read_text().strip()
        if not url:
            raise ManagerError("the measured manager serves no HTTP API (api.enabled is off)")
        process = psutil.Process(about["pid"])
        echo(f"READY after {ready:.2f}s, API at {url}; idling {SETTLE:g} s before measuring")
        await asyncio.sleep(SETTLE)
        idle = process.memory_info().rss
        runs: dict[str, Any] = {}
        peak = idle
        for batch in batches:
            what = "single events" if batch == 1 else f"batches of {batch}"
            echo(f"{what}: {concurrency} connections, {WARMUP:g} s warmup, {duration:g} s ...")
            run, run_peak = await _load(
                process, url, token, batch=batch, concurrency=concurrency, duration=duration
            )
            runs[str(batch)] = run
            peak = max(peak, run_peak)
        after = process.memory_info().rss
        await manager.stop()
        done = True
        return {
            "api": url,
            "concurrency": concurrency,
            "duration_s": duration,
            "warmup_s": WARMUP,
            "rate_limit_raised_to": {"rate_limit": RAISED_RATE, "rate_burst": RAISED_RATE},
            "batches": runs,
            "manager_rss_bytes": {"idle": idle, "peak": peak, "after": after},
        }
    except (ControlError, TimeoutError, psutil.Error) as exc:
        raise ManagerError(f"the measured manager failed: {exc}; see {work}/manager.log") from exc
    finally:
        await manager.kill()
        if done:  # else keep the log for the error message
            shutil.rmtree(work, ignore_errors=True)


async def _load(
    manager: psutil.Process, url: str, token: str, *, batch: int, concurrency: int, duration: float
) -> tuple[dict[str, Any], int]:
    """One run of the load process; its results (with the manager's peak RSS during it)
    and that peak."""
    loaded = asyncio.Event()
    peak = manager.memory_info().rss

    async def sample() -> None:
        nonlocal peak
        while not loaded.is_set():
            peak = max(peak, manager.memory_info().rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loaded.wait(), SAMPLE)

    async with asyncio.TaskGroup() as group:
        group.create_task(sample())
        try:
            out = await _run_load_process(
                url, token, manager.pid, batch=batch, concurrency=concurrency, duration=duration
            )
        finally:
            loaded.set()
    out["manager_cpu_percent"] = out.pop("server_cpu_percent")
    out["manager_rss_peak_bytes"] = peak
    return out, peak


async def _run_load_process(
    url: str, token: str, pid: int, *, batch: int, concurrency: int, duration: float
) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "manager.bench.http_load", "--url", url, "--token", token,
        "--pid", str(pid),
        "--batch", str(batch), "--concurrency", str(concurrency),
        "--duration", str(duration), "--warmup", str(WARMUP),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), WARMUP + duration + 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise ManagerError(
            f"the load process failed (exit {process.returncode}): "
            f"{stderr.decode(errors='replace').strip()[-2000:]}"
        )
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result
