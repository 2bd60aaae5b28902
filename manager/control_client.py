"""The control socket's client: one command to a running manager, one answer.

Kept apart from the server (:mod:`manager.control`) so that ``multibot status`` imports
nothing but the standard library and orjson to ask.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import orjson

from manager.errors import ManagerError


def control_path(data_dir: Path) -> Path:
    """The control socket of the manager using ``data_dir``."""
    return data_dir / "manager.sock"


class ControlError(ManagerError):
    """The manager is not reachable, or refused the command; the message says why."""


async def call(path: Path, command: str, *, timeout: float = 30.0, **args: Any) -> Any:  # noqa: ASYNC109
    """Send one command to the manager listening on ``path``; its result, else ControlError."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
            try:
                writer.write(orjson.dumps({"command": command, **args}) + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(
            f"no manager is running on {path.parent} (no control socket at {path}): start one "
            "with `multibot start`, or pass the --config it runs with"
        ) from None
    except PermissionError:
        raise ControlError(
            f"no permission to use {path}: run this as the manager's user (or root)"
        ) from None
    except TimeoutError:
        raise ControlError(f"the manager at {path} did not answer within {timeout:g}s") from None
    if not line:
        raise ControlError(f"the manager at {path} closed the connection without an answer")
    answer = orjson.loads(line)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer.get("result")
