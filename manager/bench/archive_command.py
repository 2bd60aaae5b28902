"""``multibot bench-archive``: the archive's throughput, delay, disk and replay, and with
--query-events every query on the old layout against the compact one."""

from __future__ import annotations

import json
from typing import Any

import click
import uvloop

from manager.cli.options import count_option, json_flag, rate_option, seconds_option
from manager.errors import ManagerError


@click.command("bench-archive")
@count_option(
    "--events",
    default=100_000,
    minimum=1000,
    help="Backlog archived for the throughput, then replayed.",
)
@rate_option(
    default=1000.0, minimum=1, help="Events/s published while the archive delay is measured."
)
@seconds_option("--duration", default=10.0, minimum=1)
@count_option(
    "--batch", default=2000, maximum=100_000, help="The archiver's batch size (archive.batch_size)."
)
@count_option(
    "--query-events",
    default=0,
    minimum=0,
    help="Then compare every query of the CLI and the API on the archive's old layout (a "
    "row per event) and on its compact one, over a synthetic day of this many events "
    "(0: skip; at least 1000; the issue's figures are for 10,000,000): bytes per event, "
    "and each query's p50/p95 before and after.",
)
@count_option(
    "--query-runs", default=50, help="Timed runs of each query on each layout (after 3 untimed)."
)
@click.option(
    "--only-queries",
    is_flag=True,
    help="Run only the query comparison (needs --query-events), on a private PostgreSQL.",
)
@json_flag("Print one JSON line instead of text.")
def bench_archive(
    *,
    events: int,
    rate: float,
    duration: float,
    batch: int,
    query_events: int,
    query_runs: int,
    only_queries: bool,
    as_json: bool,
) -> None:
    """Measure the PostgreSQL archive: throughput, delay at a rate, disk use, replay speed.

    Runs a private redis-server and PostgreSQL in a temporary directory. With
    --query-events, also loads a synthetic day into both layouts of the archive (each in a
    database of its own) and times every query on each.
    """
    from manager.bench.archive_bench import run_archive_bench  # noqa: PLC0415 - only here
    from manager.bench.archive_queries import (  # noqa: PLC0415 - only here
        comparison_lines,
        run_query_bench,
    )

    if only_queries and not query_events:
        raise click.UsageError("--only-queries needs --query-events N (N >= 1000)")
    if 0 < query_events < 1000:
        raise click.UsageError("--query-events must be 0 (skip) or at least 1000")
    echo = (lambda _: None) if as_json else click.echo

    async def measure() -> dict[str, Any]:
        result: dict[str, Any] = {}
        if not only_queries:
            result = await run_archive_bench(events, rate, duration, echo, batch)
        if query_events:
            result["queries"] = await run_query_bench(query_events, query_runs, echo)
        return result

    try:
        result = uvloop.run(measure())
    except (ManagerError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    if not only_queries:
        _print_archive(result)
    if query_events:
        click.echo("\n".join(comparison_lines(result["queries"])))


def _print_archive(result: dict[str, Any]) -> None:
    a, lag = result["archiver"], result["archive_delay_at_rate"]
    click.echo(
        f"archiver: {a['events_per_s']} events/s ({a['events']} events in "
        f"{a['seconds']}s, batches of {a['batch_size']})"
    )
    click.echo(
        f"archive delay at {lag['rate']:g}/s: p50 {lag['p50_ms']} ms, p95 {lag['p95_ms']} "
        f"ms, p99 {lag['p99_ms']} ms, max {lag['max_ms']} ms"
    )
    per_million, at_rate = result["disk_bytes_per_million"], result["disk_bytes_per_event_at_rate"]
    click.echo(
        f"disk: {per_million / 1e6:.1f} bytes per event over all ({per_million / 1024**2:.0f} "
        f"MiB per million events); {at_rate:.1f} bytes per event of those published at "
        f"{lag['rate']:g}/s (a day at 1,000 events/s: {at_rate * 86_400_000 / 1e9:.1f} GB)"
    )
    click.echo(
        f"replay: {result['replay_from_redis']['events_per_s']} events/s from Redis, "
        f"{result['replay_from_postgres']['events_per_s']} events/s from PostgreSQL"
    )
