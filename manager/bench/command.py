"""``multibot bench``: measure the bus against a Redis, next to a bare redis-py baseline."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import click
import structlog
import uvloop

from manager.bench.options import BenchError, BenchOptions
from manager.bench.repeats import summary_json, summary_table
from manager.bench.report import BenchReport
from manager.bench.runner import run_bench
from manager.cli.options import (
    count_option,
    json_flag,
    rate_option,
    redis_url_option,
    seconds_option,
)
from manager.errors import ManagerError
from manager.logs import configure_cli_logging


@click.command("bench")
@redis_url_option(
    help="Redis to measure against [env MULTIBOT_REDIS_URL; default: a private redis-server "
    "started for the run]. Keys go to a fresh bench-<random> namespace, deleted at the end.",
)
@count_option(
    "--producers",
    default=10,
    help="Publishing bus clients (bench-producer-<i>), one connection each.",
)
@count_option("--consumers", default=10, help="Replicas of one consuming bot, one connection each.")
@rate_option(default=1000.0, minimum=0, help="Events/s offered in total; 0 means flat out.")
@click.option("--flat-out", is_flag=True, help="Publish as fast as possible (same as --rate 0).")
@seconds_option(
    "--duration", default=10.0, min_open=True, help="Seconds measured, after the warmup."
)
@count_option(
    "--batch",
    default=None,
    help="Events per publish pipeline and per read [default: 1; flat out: 50].",
)
@count_option(
    "--read-count",
    default=None,
    help="Entries a consumer reads at most per XREADGROUP, bus and baseline alike [default: "
    "200, the bus default]. COUNT adds no latency: a read returns what is there.",
)
@count_option(
    "--processes",
    default=2,
    help="Worker processes: 2 puts the producers in one, the consumers in the other; "
    "more spreads each side over half of them; 1 runs all in one.",
)
@seconds_option(
    "--warmup", default=1.0, help="Seconds of publishing before the measurement starts."
)
@click.option("--no-baseline", is_flag=True, help="Skip the bare redis-py baseline phase.")
@click.option(
    "--relay-baseline",
    is_flag=True,
    help="Then run the baseline again through a bare relay: its producers write to an "
    "outbox that one blocking XREAD and one script per read move to the stream, as the "
    "bus's bots publish through theirs. The floor of that path of two hops on this machine.",
)
@click.option(
    "--publish-replicas",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Replicas that must confirm each bus publish (WAIT), as bus.publish_replicas: "
    "measures what the durability option costs. The baseline never waits.",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1, max=256),
    default=1,
    show_default=True,
    help="Split the bench route into N partition streams (bus.partitions), the events "
    "keyed by producer and sequence: on a Redis Cluster they spread over the shards. The "
    "baseline keeps one stream.",
)
@click.option(
    "--as-admin",
    is_flag=True,
    help="Run the bus clients as the URL's own user instead of a bot's ACL user (as the "
    "manager's bots run): compare both to see what the ACL checks cost.",
)
@click.option(
    "--deliveries",
    is_flag=True,
    help="Run the bus phase twice, back to back: as above, then with delivery records on "
    "(audit.deliveries: the consumers report each delivery with their acks, relayed and "
    "copied into PostgreSQL from the bench process); report both, the copy's lag and "
    "backlog, and the records' disk use.",
)
@click.option(
    "--postgres-dsn",
    metavar="DSN",
    default=None,
    help="PostgreSQL server for --deliveries [default: a private one started for the run]. "
    "The records go to a database created for the run (the role needs CREATEDB), dropped "
    "at the end.",
)
@click.option(
    "--repeat",
    type=click.IntRange(1, 20),
    default=1,
    show_default=True,
    help="Run it this many times and print each run's bus and baseline figures with the "
    "medians (the full table of the last run first).",
)
@json_flag("Print one JSON line instead of a table.")
def bench(
    *,
    redis_url: str | None,
    producers: int,
    consumers: int,
    rate: float,
    flat_out: bool,
    duration: float,
    batch: int | None,
    read_count: int | None,
    processes: int,
    warmup: float,
    no_baseline: bool,
    relay_baseline: bool,
    publish_replicas: int,
    partitions: int,
    as_admin: bool,
    deliveries: bool,
    postgres_dsn: str | None,
    repeat: int,
    as_json: bool,
) -> None:
    """Benchmark the event bus: throughput, end-to-end latency, losses, duplicates, RSS.

    Runs the producers and consumers as bus clients in worker processes for a fixed time
    (with --deliveries, then again with delivery records on), then the same workload with
    bare XADD / XREADGROUP / XACK, and reports all. Exits 1 if events were lost.
    """
    try:
        options = BenchOptions(
            redis_url=redis_url or None,
            producers=producers,
            consumers=consumers,
            rate=0.0 if flat_out else rate,
            duration=duration,
            batch=batch,
            read_count=read_count,
            processes=processes,
            baseline=not no_baseline,
            relay_baseline=relay_baseline,
            bot_user=not as_admin,
            publish_replicas=publish_replicas,
            partitions=partitions,
            deliveries=deliveries,
            postgres_dsn=postgres_dsn or None,
            warmup=warmup,
        )
    except BenchError as exc:
        raise click.UsageError(str(exc)) from exc
    if not structlog.is_configured():
        # Keep stdout for the report (and the --json line): warnings go to stderr.
        configure_cli_logging()
    try:
        reports = uvloop.run(_run(options, repeat))
    except ManagerError as exc:
        raise click.ClickException(str(exc)) from exc
    except asyncio.CancelledError:  # SIGTERM: cleaned up like a Ctrl-C
        raise click.Abort from None
    report = reports[-1]
    if repeat == 1:
        click.echo(json.dumps(report.to_json()) if as_json else report.table())
    elif as_json:
        click.echo(json.dumps(summary_json(reports)))
    else:
        click.echo(report.table() + "\n\n" + summary_table(reports))
    if sum(r.lost for r in reports) > report.lost:
        click.echo("error: events were lost in an earlier run (see the lost column)", err=True)
        sys.exit(1)
    records = report.records
    if report.lost:
        phases = (
            f"bus {report.bus.lost}"
            + (f", bus+records {records.phase.lost}" if records else "")
            + (f", baseline {report.baseline.lost}" if report.baseline else "")
        )
        click.echo(f"error: events were lost ({phases}): published, never handled", err=True)
        sys.exit(1)
    if report.bus.duplicated:
        click.echo(f"warning: {report.bus.duplicated} events were handled twice", err=True)
    if records and records.phase.duplicated:
        click.echo(
            f"warning: {records.phase.duplicated} events were handled twice with records on",
            err=True,
        )
    if records and records.copy.copied != records.copy.handled:
        click.echo(
            f"warning: {records.copy.copied} delivery records copied for "
            f"{records.copy.handled} deliveries handled ({records.copy.dropped} dropped)",
            err=True,
        )


async def _run(options: BenchOptions, repeat: int = 1) -> list[BenchReport]:
    """Run the benchmark ``repeat`` times; SIGTERM cancels it, so the workers, the private
    redis-server and the bench keys are cleaned up as on Ctrl-C."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def cancel_once() -> None:  # a second SIGTERM must not cut the clean-up short
        if not task.cancelling():
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, cancel_once)
    try:
        reports = []
        for n in range(repeat):
            if repeat > 1:
                click.echo(f"run {n + 1} of {repeat} ...", err=True)
            reports.append(await run_bench(options))
        return reports
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


if __name__ == "__main__":
    bench()


@click.command("bench-manager")
@count_option(
    "--rounds",
    default=3,
    help="Kills of a bot instance (a different one each round, up to 3, so each restart "
    "waits the first backoff step) and of an active replica.",
)
@json_flag("Print one JSON line instead of text.")
def bench_manager(rounds: int, as_json: bool) -> None:
    """Measure the manager on the default config: start to READY, memory, restart, failover.

    Runs `multibot start` as a real process in a temporary data directory (embedded Redis
    and PostgreSQL, the example bots) and kills bots with SIGKILL to time their recovery.
    An idle bot (one subscription, no models) runs too, weighed against a bare redis-py +
    uvloop worker blocked on XREADGROUP in the same run.
    """
    from manager.bench.manager_bench import run_manager_bench  # noqa: PLC0415 - only here

    echo = (lambda _: None) if as_json else click.echo
    try:
        result = uvloop.run(run_manager_bench(rounds, echo))
    except ManagerError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    mib = 1024 * 1024
    click.echo(
        f"start to READY: {result['ready_first_start_s']}s first (initdb), "
        f"{result['ready_second_start_s']}s on existing data"
    )
    click.echo(
        f"idle RSS: manager {result['manager_rss_bytes'] / mib:.1f} MiB, one bot "
        f"{result['bot_rss_bytes_median'] / mib:.1f} MiB (median of {result['bots']}), "
        f"Redis used_memory {result['redis_used_memory_bytes'] / mib:.1f} MiB"
    )
    click.echo(
        f"idle bot (1 subscription, no models) {result['idle_bot_rss_bytes'] / mib:.1f} MiB, "
        f"bare redis-py + uvloop worker {result['bare_worker_rss_bytes'] / mib:.1f} MiB: "
        f"{result['idle_bot_to_bare_ratio']:.3f} times"
    )
    for key, what in (
        ("restart_s", "kill -9 of a bot to its new process running"),
        ("failover_s", "kill -9 of the active replica to the standby active"),
    ):
        r = result[key]
        click.echo(f"{what}: median {r['median']}s (min {r['min']}, max {r['max']})")
    click.echo(f"SIGTERM to exit: {result['stop_s']}s")


@click.command("bench-api")
@count_option(
    "--concurrency",
    default=16,
    help="Keep-alive connections of the load process, one request in flight on each.",
)
@seconds_option(
    "--duration",
    default=10.0,
    min_open=True,
    help="Seconds measured per batch size, after 1 s of warmup.",
)
@count_option(
    "--batch",
    "batches",
    default=(1, 100),
    maximum=1000,
    multiple=True,
    help="Events per request, one run each (1: an event object; more: an array).",
)
@json_flag("Print one JSON line instead of text.")
def bench_api(concurrency: int, duration: float, batches: tuple[int, ...], as_json: bool) -> None:
    """Measure the HTTP API: events/s accepted by POST /v1/events, latency, manager RSS.

    Runs `multibot start` as a real process on the default config in a temporary data
    directory, with the API's per-token rate limit raised for the run, and loads it from a
    second process with the admin token.
    """
    from manager.bench.api_bench import run_api_bench  # noqa: PLC0415 - only here

    echo = (lambda _: None) if as_json else click.echo
    try:
        result = uvloop.run(run_api_bench(concurrency, duration, echo, batches))
    except ManagerError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    raised = result["rate_limit_raised_to"]
    click.echo(
        f"POST /v1/events on {result['api']} from a second process, {concurrency} "
        f"connections, {duration:g} s per run; rate limit raised for the run to "
        f"{raised['rate_limit']:,} requests/s (burst {raised['rate_burst']:,})"
    )
    for batch, r in result["batches"].items():
        what = "single events" if batch == "1" else f"batches of {batch}"
        errors = ", ".join(f"{n} × {code}" for code, n in r["errors"].items()) or "none"
        lat = r["latency_ms"] or dict.fromkeys(("p50", "p95", "p99", "max"), "-")
        click.echo(
            f"{what}: {r['events_per_s']:,.0f} events/s accepted ({r['requests_per_s']:,.0f} "
            f"requests/s), latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} "
            f"ms, max {lat['max']} ms; errors: {errors}; CPU manager {r['manager_cpu_percent']}"
            f"%, load process {r['load_cpu_percent']}%"
        )
    mib = 1024 * 1024
    rss = result["manager_rss_bytes"]
    click.echo(
        f"manager RSS: {rss['idle'] / mib:.1f} MiB idle, peak {rss['peak'] / mib:.1f} MiB "
        f"under load, {rss['after'] / mib:.1f} MiB after"
    )
