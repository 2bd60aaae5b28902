"""The ``multibot`` command line: one group that assembles the command groups.

Subcommands are imported when used (see :mod:`manager.cli.lazy`), so ``multibot --help``
and ``multibot status`` do not load the daemon, the HTTP API or the benchmarks.
"""

from __future__ import annotations

import sys

import click

from manager.cli.lazy import LazyGroup

_MANAGER = "manager.cli.manager"
COMMANDS = {
    "start": (f"{_MANAGER}:start", "Run the manager in the foreground: embedded services, "
              "the bots, the coordinator."),
    "status": (f"{_MANAGER}:status", "Show the running manager's bots, instances, lag and memory."),
    "stop": (f"{_MANAGER}:stop", "Ask the running manager to stop (as SIGTERM does)."),
    "restart": (f"{_MANAGER}:restart", "Restart every instance of BOT now (also one marked "
                "failed)."),
    "reload": (f"{_MANAGER}:reload", "Re-read the config file: add, remove and restart changed "
               "bots (others keep running)."),
    "maintenance": (f"{_MANAGER}:maintenance", "Publish system.maintenance.started (on) or "
                    ".ended (off)."),
    "config": (f"{_MANAGER}:config", "Inspect the configuration."),
    "events": ("manager.cli.events:events", "Publish events on the bus and watch them go by."),
    "dlq": ("manager.cli.dlq:dlq", "List, show, retry and purge dead letters (events no handler "
            "could take)."),
    "audit": ("manager.cli.audit:audit", "Operator actions (API, control socket, CLI): who did "
              "what, when, and how it ended."),
    "demo": ("manager.cli.demo:demo", "Run the example bots and print every event on the bus as it "
             "happens."),
    "bench": ("manager.bench.command:bench", "Benchmark the event bus: throughput, end-to-end "
              "latency, losses, duplicates, RSS."),
    "bench-manager": ("manager.bench.command:bench_manager", "Measure the manager on the default "
                      "config: start to READY, memory, restart, failover."),
    "bench-archive": ("manager.bench.archive_command:bench_archive", "Measure the PostgreSQL "
                      "archive: throughput, delay at a rate, disk use, replay speed."),
    "bench-api": ("manager.bench.command:bench_api", "Measure the HTTP API: events/s accepted by "
                  "POST /v1/events, latency, manager RSS."),
    "soak": ("manager.soak.command:soak", "Soak a real manager under load and faults; reconcile "
             "every confirmed publish."),
}  # fmt: skip


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="multibot", prog_name="multibot")
def main() -> None:
    """multibot: a supervisor for Python bots and their event bus on Redis Streams.

    Every command that talks to the bus takes --redis-url (or MULTIBOT_REDIS_URL) and
    --namespace (or MULTIBOT_NAMESPACE). Without a URL it uses the Redis of the manager
    running with MULTIBOT_CONFIG (else the checkout's config), else that config's redis_url,
    and names it on stderr; with neither it refuses. For example:

    \b
      multibot start                      # the manager, in the foreground
      multibot status
      multibot events publish user.note.added --data '{"user_id": 42}'
      multibot events tail 'user.#' --since 10m
      multibot dlq list
      multibot dlq retry --all --group bot-group-greeter
    """
    # The command's module is loaded by now. Logging is set up only if it brought structlog
    # along (the bus, the archive, the daemon's parts): importing structlog loads rich's
    # tracebacks, a third of `multibot status`'s start-up, and status logs nothing.
    if "structlog" in sys.modules:
        from manager.logs import configure_cli_logging  # noqa: PLC0415

        configure_cli_logging()
