"""``multibot events query`` and ``events trace``: the archive in PostgreSQL, from the shell.

Both find the running manager's PostgreSQL through its control socket when no DSN is given,
so on a server with the default config they need no flags.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
import orjson
import uvloop

from bus.archive.deliveries import GroupTrail
from bus.archive.errors import ArchiveError
from bus.archive.store import ArchiveStore
from bus.conditions import Where
from bus.errors import SubscriptionError
from bus.event import Event
from bus.patterns import Pattern
from manager.archive.trace_tree import chain_tree
from manager.cli.delivery_table import table
from manager.cli.demo import describe
from manager.cli.events import event_json
from manager.config import ConfigError, config_path, load_config
from manager.control_client import ControlError, call, control_path
from manager.times import TimeRangeError, duration_ago, utc_moment


def moment(value: str | None, hint: str) -> datetime | None:
    """A time from ``--since``/``--until``: ISO 8601 (UTC without an offset) or 30m/2h/7d ago."""
    if value is None:
        return None
    text = value.strip()
    try:
        return duration_ago(text) or utc_moment(datetime.fromisoformat(text))
    except TimeRangeError as exc:
        raise click.BadParameter(
            f"{exc}: leave the option out for no bound", param_hint=hint
        ) from None
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use a time (2026-11-26T22:40:00Z; UTC when no offset) or a duration "
            "back from now (30s, 10m, 2h, 7d)",
            param_hint=hint,
        ) from None


def archive_dsn(given: str | None) -> str:
    """``--postgres-dsn``, else the running manager's (asked through its control socket)."""
    if given:
        return given
    try:
        settings = load_config(config_path(None, os.environ))
        found = uvloop.run(call(control_path(settings.data_dir), "connection", timeout=5))
    except (ConfigError, ControlError) as exc:
        raise click.ClickException(
            f"no archive to read: pass --postgres-dsn (or MULTIBOT_POSTGRES_DSN), or run this "
            f"where a manager runs ({exc})"
        ) from None
    dsn = found.get("postgres_dsn") if isinstance(found, dict) else None
    if not isinstance(dsn, str):
        raise click.ClickException("the running manager has no PostgreSQL: pass --postgres-dsn")
    return dsn


def dsn_option(fn: Any) -> Any:
    return click.option(
        "--postgres-dsn",
        envvar="MULTIBOT_POSTGRES_DSN",
        show_envvar=True,
        metavar="DSN",
        help="The archive [default: the running manager's, through its control socket].",
    )(fn)


async def _query(dsn: str, limit: int, after: str | None, **filters: Any) -> Any:
    async with await ArchiveStore.connect(dsn) as store:
        found: list[Event] = []
        cursor = after
        while len(found) < limit:
            page, cursor = await store.query(after=cursor, limit=limit - len(found), **filters)
            found += page
            if cursor is None:
                break
        return found, cursor


@click.command()
@click.option("--type", "types", multiple=True, metavar="PATTERN", help="Type pattern (repeat).")
@click.option("--source", help="Only events from this publisher.")
@click.option("--since", help="From this time (2026-11-26T22:40:00Z) or duration ago (2h).")
@click.option("--until", help="Before this time or duration ago.")
@click.option("--where", help="Conditions on data, JSON: '{\"user_id\": 42}'.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--after", metavar="CURSOR", help="Continue after the page that printed CURSOR.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per event.")
@dsn_option
def query(
    *,
    types: Sequence[str],
    source: str | None,
    since: str | None,
    until: str | None,
    where: str | None,
    limit: int,
    after: str | None,
    as_json: bool,
    postgres_dsn: str | None,
) -> None:
    """Archived events (all 7 days of them), oldest first, by type, source, time and data."""
    try:
        for pattern in types:
            Pattern(pattern)
        conditions = orjson.loads(where) if where else None
        if conditions is not None:
            Where(conditions)
    except (SubscriptionError, orjson.JSONDecodeError) as exc:
        raise click.BadParameter(str(exc)) from None
    filters = {
        "types": list(types),
        "source": source,
        "since": moment(since, "'--since'"),
        "until": moment(until, "'--until'"),
        "where": conditions,
    }
    try:
        found, cursor = uvloop.run(_query(archive_dsn(postgres_dsn), limit, after, **filters))
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None
    for event in found:
        click.echo(orjson.dumps(event_json(event)).decode() if as_json else describe(event))
    if cursor is not None:
        click.echo(f"more: --after {cursor}", err=True)


async def _trace(
    dsn: str, correlation_id: str, deliveries: bool
) -> tuple[list[Event], dict[str, list[GroupTrail]]]:
    """The chain, and (with ``deliveries``) each event's deliveries by event id."""
    async with await ArchiveStore.connect(dsn) as store:
        chain = await store.trace(correlation_id)
        trails = {}
        if deliveries:
            for event in chain:
                trails[event.id] = await store.deliveries.trail(
                    event.id, event.timestamp, event.type
                )
        return chain, trails


#: Tree levels the text of ``events trace`` indents; deeper lines say their depth instead.
_MAX_INDENT = 20


def _branch(depth: int) -> str:
    """The indentation of a line ``depth`` hops below its root."""
    if depth <= _MAX_INDENT:
        return "  " * depth + ("└─ " if depth else "")
    return "  " * _MAX_INDENT + f"└─[{depth}] "


@click.command()
@click.argument("correlation_id")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON line per event, depth-first, with parent_id and depth.",
)
@click.option(
    "--deliveries/--no-deliveries",
    default=True,
    show_default=True,
    help="Under each event, what each consumer group did with it.",
)
@dsn_option
def trace(correlation_id: str, as_json: bool, deliveries: bool, postgres_dsn: str | None) -> None:
    """A correlation chain from the archive, as a tree by causation, with deliveries.

    Each event is printed under the event that caused it, depth-first; past 20 levels the
    indentation stops growing and each line shows its depth as [N]. With --json each event
    is one JSON line with ``parent_id`` (its cause in the tree, null for a root) and
    ``depth``, in the same order: no nesting, so any depth prints.

    Under each event comes its deliveries table (as ``events show`` prints it), or in JSON
    its ``groups``; --no-deliveries leaves them out.
    """
    try:
        chain, trails = uvloop.run(_trace(archive_dsn(postgres_dsn), correlation_id, deliveries))
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None
    if not chain:
        raise click.ClickException(f"no archived event has correlation id {correlation_id}")
    for node in chain_tree(chain):
        groups = trails.get(node.event.id)
        if as_json:
            line = {**event_json(node.event), "parent_id": node.parent_id, "depth": node.depth}
            if groups is not None:
                line["groups"] = [t.as_json() for t in groups]
            click.echo(orjson.dumps(line).decode())
            continue
        click.echo(_branch(node.depth) + describe(node.event))
        if groups:  # an event no group received nor expected: nothing under it
            indent = " " * len(_branch(node.depth)) + "   "
            for row in table(groups, indent):
                click.echo(row)
