"""``multibot audit``: the operator actions the audit log holds, oldest first.

Like ``events query``, it finds the running manager's PostgreSQL through its control
socket when no DSN is given.
"""

from __future__ import annotations

from datetime import UTC, datetime

import click
import orjson
import uvloop

from bus.archive.audit_log import AuditRecord
from bus.archive.errors import ArchiveError
from bus.archive.store import ArchiveStore
from manager.cli.archive import archive_dsn, dsn_option, moment

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def _list(
    dsn: str, since: datetime, actor: str | None, action: str | None, limit: int
) -> list[AuditRecord]:
    async with await ArchiveStore.connect(dsn) as store:
        found: list[AuditRecord] = []
        after = None
        while len(found) < limit:
            page = await store.audit.list(
                since, after=after, actor=actor, action=action, limit=min(1000, limit - len(found))
            )
            found += page
            if len(page) < min(1000, limit):
                break
            after = (page[-1].at, page[-1].id)
        return found


def describe(entry: AuditRecord) -> str:
    """One line: time, actor, channel, action, target, outcome (and why)."""
    at = entry.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    target = f" {entry.target}" if entry.target else ""
    why = f": {entry.error}" if entry.error else ""
    return f"{at}  {entry.actor} ({entry.channel})  {entry.action}{target}  {entry.outcome}{why}"


@click.command()
@click.option("--since", help="From this time (2026-11-26T22:40:00Z) or duration ago (24h).")
@click.option("--actor", help="Only this actor (token:NAME or user:NAME).")
@click.option("--action", help="Only actions starting so (dlq, restart, events.publish).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per action.")
@dsn_option
def audit(
    *,
    since: str | None,
    actor: str | None,
    action: str | None,
    limit: int,
    as_json: bool,
    postgres_dsn: str | None,
) -> None:
    """Operator actions (API, control socket, CLI): who did what, when, and how it ended.

    Oldest first: publishes with API tokens, restarts, dead-letter retries, deletes and
    purges, reloads, maintenance and stops, with who made them (the API token's name, or
    the OS user of the control socket's peer or of the CLI)."""
    start = moment(since, "'--since'") or _EPOCH
    try:
        found = uvloop.run(_list(archive_dsn(postgres_dsn), start, actor, action, limit))
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None
    for entry in found:
        click.echo(orjson.dumps(entry.as_json()).decode() if as_json else describe(entry))
    if not found and not as_json:
        click.echo("No operator actions recorded" + (" in that time." if since else "."))
