"""``multibot soak``: the click command (options, the run, the exit code)."""

from __future__ import annotations

from pathlib import Path

import click
import uvloop

from manager.cli.options import count_option, json_flag, rate_option, seconds_option
from manager.cli.output import echo_json
from manager.config import DEFAULT_CONFIG_PATH, ConfigError
from manager.errors import ManagerError
from manager.soak.faults import FAULTS
from manager.soak.report import render
from manager.soak.run import SoakOptions, run_soak


def _faults(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return FAULTS
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise click.BadParameter(
            f"unknown fault {', '.join(unknown)}: use 'all' or some of {', '.join(FAULTS)}"
        )
    return tuple(names)


@click.command()
@rate_option(default=1000.0, minimum=1, help="soak.tick events per second.")
@seconds_option("--duration", default=120.0, minimum=5, help="Seconds of load.")
@click.option(
    "--faults",
    default="",
    callback=_faults,
    metavar="LIST",
    help=f"Comma-separated, or 'all': {', '.join(FAULTS)}.",
)
@seconds_option(
    "--hold",
    default=3.0,
    minimum=0.5,
    help="Seconds a held fault lasts (pause, oom, read-only, disk full).",
)
@seconds_option(
    "--pg-down",
    default=None,
    minimum=1,
    metavar="SECONDS",
    help="Also keep the archive failing (disk full) this long, first.",
)
@count_option("--loaders", default=1, maximum=16, help="Load processes.")
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    help="Config to soak (the soak bots are added).  [default: the checkout's]",
)
@click.option("--keep", is_flag=True, help="Keep the run's directory (kept anyway on a failure).")
@json_flag("One JSON document.")
def soak(  # noqa: PLR0917 - click passes the options as arguments
    rate: float,
    duration: float,
    faults: tuple[str, ...],
    hold: float,
    pg_down: float | None,
    loaders: int,
    config: Path,
    keep: bool,
    as_json: bool,
) -> None:
    """Soak a real manager under load and faults; reconcile every confirmed publish.

    It runs `multibot start` on the config plus two soak bots (embedded Redis and
    PostgreSQL in a temporary directory), publishes soak.tick at --rate while it injects
    each listed fault at least once, then checks by event id that every confirmed publish
    was handled or dead-lettered by every soak group and stored (or set aside) by the
    archive. Exit 1 on any loss or a manager exit the soak did not cause.

    \b
      multibot soak --duration 30 --faults bot-kill,redis-kill,pg-diskfull
      multibot soak --duration 120 --faults all --json
      multibot soak --duration 90 --pg-down 60      # Redis memory with the archive down
    """
    options = SoakOptions(
        duration=duration, rate=rate, faults=faults, hold=hold, pg_down=pg_down,
        loaders=loaders, config=config, keep=keep,
    )  # fmt: skip
    echo = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    try:
        report = uvloop.run(run_soak(options, echo))
    except (ManagerError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        echo_json(report.model_dump(mode="json"))
    else:
        render(report, click.echo)
    if not report.ok:
        raise SystemExit(1)
