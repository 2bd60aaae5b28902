"""A bot process from start to exit: read the spec from stdin, configure logging, load the
bot's entry point, run it, exit with its code (``python -m bots.runtime`` calls :func:`main`).

The spec is read as plain data (:func:`bus.supervision.read_spec`): the manager validated it.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog
import uvloop

from bots.runtime.bot import run_bot
from bots.runtime.entry import EntryPointError, load_main
from bus.supervision import EXIT_CONFIG, PlainRuntimeSpec, SpecError, read_spec


def _configure_logging(spec: PlainRuntimeSpec) -> None:
    """JSON lines on stderr (the manager parses them), with the bot id and instance bound."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if spec.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[spec.log_level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(bot_id=spec.bot_id, instance=spec.instance)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def _read_spec_line() -> tuple[bytes, bytes]:
    """The first line of stdin (the spec) and whatever was read past it (commands)."""
    buffer = b""
    while b"\n" not in buffer:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line, rest


def main() -> None:
    """Entry point of a bot process."""
    line, commands = _read_spec_line()
    try:
        spec = read_spec(line)
    except SpecError as exc:
        sys.stderr.write(f"bots.runtime: bad spec on stdin (start bots with multibot): {exc}\n")
        sys.exit(EXIT_CONFIG)
    _configure_logging(spec)
    log = structlog.get_logger("bots.runtime")
    if spec.manager_pid is not None and os.getppid() != spec.manager_pid:
        log.error("the manager exited before this bot started; exiting")
        sys.exit(1)
    # The first heartbeat comes from the event loop, at once after this import: the manager
    # gives a process its start-up timeout for that first beat, and its heartbeat timeout
    # only after it. Not earlier on purpose: one beat before this (synchronous) import would
    # start the short heartbeat clock that a slow import then misses, and beats from a
    # thread during it would hide an import that never returns.
    try:
        bot_main = load_main(spec.entry)
    except EntryPointError as exc:
        log.error("cannot load the bot", error=str(exc))
        sys.exit(EXIT_CONFIG)
    log.info("bot starting", entry=spec.entry, pid=os.getpid())
    code = uvloop.run(run_bot(spec, bot_main, commands=commands))
    log.info("bot stopped", code=code)
    sys.exit(code)
