"""``multibot soak`` end to end: a real manager under load and faults loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import psutil
import pytest

from tests.daemon.manager_process import REPO
from tests.daemon.test_start import multibot
from tests.support import wait_until

FAULTS = "bot-kill,redis-kill,pg-diskfull,hung-handler,hostile"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_a_short_soak_with_faults_loses_nothing() -> None:
    """35 s at 1000/s with five fault classes: every confirmed event handled (or dead-lettered)
    by both soak groups and archived, the manager never exited on its own, the run-once
    group's only duplicates are events whose process was killed mid-flight."""
    done = multibot("soak", "--duration", "35", "--faults", FAULTS, "--json", timeout=280)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    if report["lost"]:  # the whole report (which fault's window, which ids) and the logs
        pytest.fail(f"events lost:\n{json.dumps(report, indent=1)}\n{done.stderr[-30_000:]}")
    assert report["unexpected_manager_exits"] == 0
    assert report["caught_up"], report["backlog_left"]
    assert done.returncode == 0, done.stderr
    assert report["confirmed"] > 10_000
    assert {f["fault"] for f in report["faults"]} == set(FAULTS.split(","))
    assert report["fault_errors"] == []
    for name, group in report["groups"].items():
        assert group["unexplained_duplicates"] == 0, (name, group["unexplained_sample"])
    once = report["groups"]["bot-group-soak-once"]["duplicates_by_cause"]
    assert set(once) <= {"bot-kill"}, once  # the run-once helper: only a kill mid-handler
    assert report["hung_handler"]["published"] == 2
    assert report["hung_handler"]["bot-group-soak-plain timeout"] == 2
    assert report["hung_handler"]["bot-group-soak-once timeout"] == 2
    malformed = [h for h in report["hostile"] if h["kind"] != "near-limit-id"]
    for entry in malformed:
        assert "bot-group-soak-plain: malformed" in entry["dead_letters"], entry
        assert "bot-group-soak-once: malformed" in entry["dead_letters"], entry
    memory = report["redis_memory"]
    assert memory["maxmemory_bytes"] > 0  # the embedded Redis is bounded
    assert memory["over_maxmemory_samples"] == 0


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_killed_soak_takes_its_manager_and_loaders_along(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """`multibot soak` SIGKILLed from outside (a CI timeout, an operator's kill -9): the
    manager it started and its load processes die with it, and with the manager its bots
    and embedded servers; nothing is left running. (Its directory, which a killed soak
    cannot remove, is made under ``reachable_dir``, which the fixture removes.)"""
    env = {**os.environ, "TMPDIR": str(reachable_dir)}
    with (tmp_path / "soak.log").open("wb") as log:
        soak = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "manager.cli", "soak", "--duration", "120",
            "--faults", "bot-kill", cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=log, env=env,
        )  # fmt: skip
    started: list[psutil.Process] = []
    try:

        def running_load() -> bool:
            children = psutil.Process(soak.pid).children(recursive=True)
            commands = []
            for child in children:
                with contextlib.suppress(psutil.Error):  # one that just ended
                    commands.append(" ".join(child.cmdline()))
            started[:] = children
            return any("manager.cli start" in c for c in commands) and any(
                "manager.soak.load" in c for c in commands
            )

        await wait_until(running_load, 120, "the soak's manager and load running")
    finally:
        soak.kill()
        await soak.wait()

    def alive(process: psutil.Process) -> bool:
        try:
            return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def all_gone() -> bool:
        return not [p for p in started if alive(p)]

    await wait_until(all_gone, 30, f"every process of the soak gone: {started}")
