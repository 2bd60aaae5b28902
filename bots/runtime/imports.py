"""What a bot process keeps out of its memory: the optional packages structlog would load.

structlog imports rich (pretty console tracebacks) and greenlet (its deprecated thread-local
context) whenever they are installed, and where the manager runs they are: rich draws
``multibot status``. A bot process logs JSON lines and uses neither; together they are
about 5 MiB of an idle bot's RSS, a seventh of it.
"""

from __future__ import annotations

import importlib
import sys

#: The optional packages structlog loads when installed, which a bot process never uses.
HIDDEN = ("rich", "greenlet")


def import_structlog() -> None:
    """Import structlog with :data:`HIDDEN` hidden from it; nothing if it is loaded already.

    Hidden only while structlog imports: a bot that imports rich or greenlet itself gets
    them (structlog then still renders tracebacks plainly, as it does without rich).
    """
    if "structlog" in sys.modules:
        return
    hidden = [name for name in HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name`: ImportError
    try:
        importlib.import_module("structlog")
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
