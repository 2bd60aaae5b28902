"""Finding a bot's ``async def main(bus)`` from its ``package.module:function`` entry point."""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from bots.runtime.bot import BotMain


class EntryPointError(Exception):
    """The entry point cannot be loaded; the message says what to fix in the config."""


def load_main(entry: str) -> BotMain:
    """Import the module and return its coroutine function; EntryPointError if unusable."""
    module_name, _, name = entry.partition(":")
    name = name or "main"
    if not module_name:
        raise EntryPointError(f"{entry!r} is not an entry point: write 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EntryPointError(
            f"cannot import {module_name!r} for entry point {entry!r}: {exc}; check the bot's "
            "`entry` and that the module is installed where the manager runs"
        ) from exc
    except Exception as exc:  # a SyntaxError or a module that raises on import
        raise EntryPointError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}; fix the bot's code"
        ) from exc
    function = getattr(module, name, None)
    if function is None or not inspect.iscoroutinefunction(function):
        raise EntryPointError(
            f"{module_name} has no `async def {name}(bus)` (entry point {entry!r})"
        )
    return cast("BotMain", function)
