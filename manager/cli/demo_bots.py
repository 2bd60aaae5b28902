"""The demo's bots, run as the manager runs them: one ``python -m bots.runtime`` process
each, its spec on stdin, so the command line never imports bot code.

A bot is ready once its consumer has read from the stream its chat arrives on (Redis then
lists the consumer in the group); it is stopped by the ``stop`` command on stdin, then
SIGKILL after a grace period. Its warnings and errors go to the demo's stderr; a bot
process that ends while the demo runs ends the demo with its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any

from redis.asyncio import Redis

from bus import EventType
from bus.keys import Keys, group_name
from bus.routing import Router
from bus.settings import BusSettings
from bus.supervision import RuntimeSpec
from manager.embedded.child_process import child_setup
from manager.errors import ManagerError


class BotExitedError(ManagerError):
    """A demo bot's process ended while the demo ran."""


class BotProcess:
    """One bot process of the demo."""

    def __init__(self, bot_id: str, entry: str, settings: BusSettings) -> None:
        self.bot_id = bot_id
        self.spec = RuntimeSpec(
            bot_id=bot_id,
            instance=0,
            entry=entry,
            bus=settings,
            log_level="warning",
            log_json=False,
            manager_pid=os.getpid(),
        )
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Spawn it and hand it its spec."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bots.runtime",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            preexec_fn=child_setup(),  # its stderr is ours; it dies with us
        )  # fmt: skip
        assert self.process.stdin is not None
        self.process.stdin.write(self.spec.model_dump_json().encode() + b"\n")
        await self.process.stdin.drain()

    async def exited(self) -> BotExitedError:
        """Wait until the process ends; the error saying so."""
        assert self.process is not None
        code = await self.process.wait()
        return BotExitedError(
            f"bot {self.bot_id} exited with code {code} (its errors, if any, are above)"
        )

    async def stop(self, grace: float) -> None:
        """Ask it to stop (in-flight handlers finish), SIGKILL after ``grace`` seconds."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        with contextlib.suppress(ConnectionError):
            process.stdin.write(b"stop\n")
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            await process.wait()


class DemoBots:
    """The demo's bot processes."""

    def __init__(self, bots: tuple[tuple[str, str], ...], settings: BusSettings) -> None:
        self.settings = settings
        self.bots = [BotProcess(bot_id, entry, settings) for bot_id, entry in bots]

    async def start(self) -> None:
        """Spawn every bot."""
        for bot in self.bots:
            await bot.start()

    async def ready(self, redis: Redis, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Until every bot's consumer has read the stream user messages arrive on;
        :class:`BotExitedError` if one has not after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._ready(redis)
        except TimeoutError:
            raise BotExitedError(
                f"the demo bots did not start consuming within {timeout:g}s: see their errors above"
            ) from None

    async def _ready(self, redis: Redis) -> None:
        router = Router.of(self.settings)
        stream = Keys(self.settings.namespace).stream(router.route(EventType.MESSAGE_RECEIVED))
        waiting = {group_name(bot.bot_id) for bot in self.bots}
        while waiting:
            with contextlib.suppress(Exception):  # the stream or a group may not exist yet
                groups: Any = await redis.xinfo_groups(stream)
                waiting -= {str(g["name"]) for g in groups if int(g["consumers"]) > 0}
            await asyncio.sleep(0.05)  # polling: Redis does not announce a new consumer

    async def watch(self) -> None:
        """Raise :class:`BotExitedError` as soon as a bot process ends."""
        waits = [asyncio.ensure_future(bot.exited()) for bot in self.bots]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            raise next(iter(done)).result()
        finally:
            for wait in waits:
                wait.cancel()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop every bot, together."""
        await asyncio.gather(*(bot.stop(grace) for bot in self.bots))
