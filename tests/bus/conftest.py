"""Fixtures of the bus tests: consumers in processes of their own, for tests that SIGKILL
them (``tests/bus/consumer_proc.py``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from tests.support import ChildProc, wait_until

REPO = Path(__file__).resolve().parents[2]


class ConsumerProc(ChildProc):
    """A consumer process started by :func:`consumer_procs`; reads the lines it writes."""

    name = "consumer"

    def lines(self) -> list[str]:
        """The progress lines written so far (``ready``, ``taken <id>``, ``handled <id>``)."""
        return self.out.read_text().splitlines() if self.out.exists() else []

    def ids(self, step: str) -> list[str]:
        """Event ids of the ``taken`` or ``handled`` lines, in order."""
        return [line.split()[1] for line in self.lines() if line.startswith(step + " ")]

    async def wait_for(self, step: str, *event_ids: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until the process wrote ``step`` for every id; fail with its log otherwise."""
        wanted = set(event_ids)
        await self._wait(lambda: wanted <= set(self.ids(step)), timeout, f"{step} {wanted}")

    async def wait_ready(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Wait until its consumer groups exist and it reads."""
        await self._wait(lambda: "ready" in self.lines(), timeout, "ready")

    async def wait_exit(self, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        """Wait for the process to end by itself; its exit code."""
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"consumer did not exit in {timeout}s\n{self.log_tail()}"
            ) from None

    async def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
        def check() -> bool:
            if done():
                return True
            if self.process.returncode is not None:
                raise AssertionError(
                    f"consumer exited ({self.process.returncode}) before {what}\n{self.log_tail()}"
                )
            return False

        try:
            await wait_until(check, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None


class ConsumerProcs(Protocol):
    """Starts a consumer process on the test's Redis (options as ``consumer_proc``'s)."""

    async def __call__(
        self,
        bot: str,
        instance: int | str,
        *,
        hang_on: str | None = None,
        die_on: str | None = None,
        visibility_timeout: float = 60.0,
        max_deliveries: int = 10,
        ready: bool = True,
        extra: Sequence[str] = (),
    ) -> ConsumerProc: ...


@pytest.fixture
async def consumer_procs(redis_url: str, tmp_path: Path) -> AsyncIterator[ConsumerProcs]:
    """Start consumer processes (waiting until they read, unless ``ready=False``); every one
    still alive is SIGKILLed at teardown, whether the test passed or not."""
    procs: list[ConsumerProc] = []

    async def start(
        bot: str,
        instance: int | str,
        *,
        hang_on: str | None = None,
        die_on: str | None = None,
        visibility_timeout: float = 60.0,
        max_deliveries: int = 10,
        ready: bool = True,
        extra: Sequence[str] = (),
    ) -> ConsumerProc:
        name = f"{bot}-{instance}-{len(procs)}"
        out, log = tmp_path / f"{name}.out", tmp_path / f"{name}.log"
        args = [
            "--redis-url", redis_url, "--bot", bot, "--instance", str(instance),
            "--out", str(out), "--visibility-timeout", str(visibility_timeout),
            "--max-deliveries", str(max_deliveries),
        ]  # fmt: skip
        args += ["--hang-on", hang_on] if hang_on else []
        args += ["--die-on", die_on] if die_on else []
        args += extra
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.bus.consumer_proc", *args,
                cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        proc = ConsumerProc(process, out, log)
        procs.append(proc)
        if ready:
            await proc.wait_ready()
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            await proc.kill()
