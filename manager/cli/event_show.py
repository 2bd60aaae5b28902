"""``multibot events show ID``: an archived event and what each consumer group did with it.

The table has one line per delivery outcome a group reported (handled, dead-lettered,
skipped by its ``where`` conditions, retried), its dead letters with their DLQ id, and a
line ``expected, not handled`` for a group that declared a matching subscription when the
event was published and has nothing recorded: the first question after an incident.
"""

from __future__ import annotations

import click
import orjson
import uvloop

from bus.archive.deliveries import GroupTrail
from bus.archive.errors import ArchiveError
from bus.archive.store import ArchiveStore
from bus.event import Event
from manager.cli.archive import archive_dsn, dsn_option
from manager.cli.delivery_table import table
from manager.cli.demo import describe
from manager.cli.events import event_json


async def trails_of(store: ArchiveStore, event: Event) -> list[GroupTrail]:
    """The event's deliveries per group (see :meth:`Deliveries.trail`)."""
    return await store.deliveries.trail(event.id, event.timestamp, event.type)


async def _show(dsn: str, event_id: str) -> tuple[Event | None, list[GroupTrail]]:
    async with await ArchiveStore.connect(dsn) as store:
        event = await store.get(event_id)
        return event, ([] if event is None else await trails_of(store, event))


@click.command()
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the event and its groups.")
@dsn_option
def show(event_id: str, as_json: bool, postgres_dsn: str | None) -> None:
    """An archived event and what each consumer group did with it.

    Each group that received it shows its outcomes (handled, dead_lettered, skipped by its
    where conditions, retried) with the consumer, Redis's delivery count, when it was read
    and done, and the handler's time; a dead letter shows its DLQ id. A group that declared
    a matching subscription when the event was published and recorded nothing shows
    "expected, not handled".
    """
    if "\x00" in event_id:
        raise click.BadParameter("an event id has no NUL character", param_hint="'EVENT_ID'")
    try:
        event, trails = uvloop.run(_show(archive_dsn(postgres_dsn), event_id))
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None
    if event is None:
        raise click.ClickException(
            f"no archived event has id {event_id} (archiving takes a moment; older than the "
            "retention is gone)"
        )
    if as_json:
        line = {**event_json(event), "groups": [t.as_json() for t in trails]}
        click.echo(orjson.dumps(line).decode())
        return
    click.echo(describe(event))
    click.echo(f"id {event.id}  correlation {event.correlation_id or event.id}")
    click.echo("")
    for row in table(trails):
        click.echo(row)
