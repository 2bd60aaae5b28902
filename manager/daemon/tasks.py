"""The manager's tasks at shutdown and on demand: cancelling them for sure, showing where
they wait."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog

log = structlog.get_logger("manager")


async def cancel_all(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them; cancel again any that swallowed the cancel (a
    redis-py call on Python 3.11 can), saying where it was, so shutdown never hangs."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        _, late = await asyncio.wait(pending, timeout=2.0)
        for task in late:
            frames = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack()]
            log.warning("a task ignored its cancel; cancelling again", task=repr(task), at=frames)


def log_tasks() -> None:
    """SIGUSR2: log where every task of the manager waits (for a manager that seems stuck)."""
    for task in asyncio.all_tasks():
        frames = [
            f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()
        ]
        log.warning("task", name=task.get_name(), coro=repr(task.get_coro()), stack=frames)
