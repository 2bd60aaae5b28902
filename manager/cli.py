"""The ``multibot`` command line: one group that assembles the command groups."""

from __future__ import annotations

import click

from manager.bench.command import bench, bench_api, bench_archive, bench_manager
from manager.cli_archive import query, trace
from manager.cli_common import configure_logging
from manager.cli_dlq import dlq
from manager.cli_events import events
from manager.cli_manager import config, maintenance, reload, restart, start, status, stop
from manager.demo import demo
from manager.soak.command import soak


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    configure_logging()


for command in (start, status, stop, restart, reload, maintenance, config):
    main.add_command(command)
events.add_command(query)
events.add_command(trace)
main.add_command(events)
main.add_command(dlq)
main.add_command(demo)
main.add_command(bench)
main.add_command(bench_manager)
main.add_command(bench_archive)
main.add_command(bench_api)
main.add_command(soak)

if __name__ == "__main__":
    main(prog_name="multibot")
