"""The daemon's commands: ``start``, and those that talk to a running manager, and ``config``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
import uvloop

from manager.config import ConfigError, ManagerSettings, config_path, load_config
from manager.control_client import ControlError, call, control_path
from manager.errors import ManagerError

F = TypeVar("F", bound=Callable[..., Any])


def config_option(fn: F) -> F:
    """``--config PATH`` (or MULTIBOT_CONFIG): the manager's config file."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Config file [default: MULTIBOT_CONFIG, else the checkout's config/multibot.toml].",
    )(fn)


def _settings(config_file: Path | None) -> tuple[ManagerSettings, Path]:
    path = config_path(config_file, os.environ)
    try:
        return load_config(path), path
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _call(config_file: Path | None, command: str, **args: Any) -> Any:
    settings, _ = _settings(config_file)
    try:
        return uvloop.run(call(control_path(settings.data_dir), command, **args))
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@config_option
def start(config_file: Path | None) -> None:
    """Run the manager in the foreground: embedded services, the bots, the coordinator.

    Logs JSON lines to stderr when not on a terminal (journald). SIGTERM or SIGINT stops
    it cleanly; SIGHUP reloads the config. Under systemd it reports READY=1 and pings the
    watchdog (see systemd/multibot.service).
    """
    settings, path = _settings(config_file)
    from manager.logs import configure_logging  # noqa: PLC0415 - only start logs

    configure_logging(settings.log_level)
    try:
        from manager.daemon.manager import run_manager  # noqa: PLC0415 - the CLI starts without it

        code = uvloop.run(run_manager(settings, path))
    except ManagerError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
def status(config_file: Path | None, as_json: bool) -> None:
    """Show the running manager's bots, instances, lag and memory."""
    result = _call(config_file, "status")
    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        # In a pipe rich would wrap at 80 columns; keep each row on one line instead.
        from rich.console import Console  # noqa: PLC0415 - --json goes without it

        from manager.cli.status_view import render_status  # noqa: PLC0415
        from manager.status import ManagerStatus  # noqa: PLC0415

        document = ManagerStatus.model_validate(result)
        render_status(document, Console(width=None if sys.stdout.isatty() else 200))


@click.command()
@config_option
def stop(config_file: Path | None) -> None:
    """Ask the running manager to stop (as SIGTERM does)."""
    click.echo(_call(config_file, "stop"))


@click.command()
@config_option
@click.argument("bot")
def restart(config_file: Path | None, bot: str) -> None:
    """Restart every instance of BOT now (also one marked failed)."""
    click.echo(_call(config_file, "restart", bot=bot))


@click.command()
@config_option
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--reason", help="Why, carried in the event.")
def maintenance(config_file: Path | None, state: str, reason: str | None) -> None:
    """Publish system.maintenance.started (on) or .ended (off)."""
    click.echo(_call(config_file, "maintenance", on=state == "on", reason=reason))


@click.command()
@config_option
def reload(config_file: Path | None) -> None:
    """Re-read the config file: add, remove and restart changed bots (others keep running)."""
    result = _call(config_file, "reload")
    for key in ("added", "removed", "changed"):
        click.echo(f"{key}: {', '.join(result[key]) or '-'}")


@click.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("check")
@config_option
def config_check(config_file: Path | None) -> None:
    """Validate the config file (with the environment's overrides); list every error."""
    settings, path = _settings(config_file)
    bots = ", ".join(f"{b.id}×{b.replicas}" for b in settings.bots) or "none"
    click.echo(f"{path}: OK (bots: {bots})")
