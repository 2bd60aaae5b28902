"""The soak bots' entry: record every handled ``soak.tick`` to a per-process file.

``soak-plain`` and ``soak-once`` run this module (``entry = "manager.soak.bot:main"``); the
manager passes, through the bot's ``environment``, the directory of the records
(:data:`RECORDS_ENV`) and whether the handler uses the run-once helper (:data:`RUN_ONCE_ENV`,
``idempotent_ttl``). Each handled tick appends one line ``<event id> <pid> <wall time>``
with a single unbuffered ``write`` to ``<bot id>-<pid>.handled`` in that directory, so a
SIGKILLed process keeps every line it wrote and what each group handled is known exactly.

A ``soak.hang`` event blocks its handler until the consumer's ``handler_timeout`` cancels
it: the soak's ``hung-handler`` fault expects it dead-lettered with reason ``timeout``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bus import BusClient, Event

#: Environment variable naming the directory of the handled records.
RECORDS_ENV = "SOAK_RECORDS"
#: Environment variable: "1" makes the handler use the run-once helper.
RUN_ONCE_ENV = "SOAK_RUN_ONCE"
#: The event type the load publishes, and the one that hangs a handler.
TICK = "soak.tick"
HANG = "soak.hang"
#: Seconds a run-once marker is kept: longer than any soak.
RUN_ONCE_TTL = 6 * 3600.0


class Recorder:
    """Appends handled event ids to this process's record file (one write per line)."""

    def __init__(self, directory: Path, bot_id: str) -> None:
        self.path = directory / f"{bot_id}-{os.getpid()}.handled"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<Recorder path={self.path}>"

    async def handle(self, event: Event) -> None:
        """The subscription's handler: record a tick, hang on ``soak.hang``."""
        if event.type == HANG:
            await asyncio.Event().wait()  # until the handler timeout cancels it
        os.write(self._fd, f"{event.id} {self._pid} {time.time():.6f}\n".encode())

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


async def main(bus: BusClient) -> None:
    """Subscribe the recorder to ``soak.*`` and consume until stopped."""
    directory = Path(os.environ[RECORDS_ENV])  # the bot's own environment, set in its config
    recorder = Recorder(directory, bus.bot_id)
    run_once = os.environ.get(RUN_ONCE_ENV) == "1"
    bus.subscribe(
        "soak.*", recorder.handle, name="record", idempotent_ttl=RUN_ONCE_TTL if run_once else None
    )
    try:
        await bus.run()
    finally:
        recorder.close()
