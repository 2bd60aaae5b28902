"""``multibot bench-api``: events/s accepted by ``POST /v1/events``, its latency, the RSS.

It runs ``multibot start`` on the checkout's default config (embedded Redis and PostgreSQL,
the example bots, the API on a free port) in a temporary data directory, as
``multibot bench-manager`` does, with the per-token rate limit raised out of the way
(``api.rate_limit`` and ``api.rate_burst``, :data:`RAISED_RATE`): what is measured is the
API, not the limiter. For each batch size in turn, a second process
(:mod:`manager.bench.http_load`) posts events with the admin token (handed over on its
stdin, never its command line) over ``concurrency`` keep-alive connections, while the
manager's RSS is sampled; the manager's RSS is also taken idle, before the first load.
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
    except (ManagerExitedError, ControlError, TimeoutError, psutil.Error) as exc:
        keep = True
        raise ManagerError(f"the measured manager failed: {exc}; see {work}/manager.log") from exc
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "api": url,
        "concurrency": concurrency,
        "duration_s": duration,
        "warmup_s": WARMUP,
        "rate_limit_raised_to": {"rate_limit": RAISED_RATE, "rate_burst": RAISED_RATE},
        "batches": runs,
        "manager_rss_bytes": {"idle": idle, "peak": peak, "after": after},
    }


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
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "manager.bench.http_load", "--token-file", "-", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(f"{token}\n".encode()), warmup + duration + 60
        )
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
