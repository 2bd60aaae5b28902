"""``multibot dlq``: list, show, retry and purge dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
from redis.asyncio import Redis

from bus.cluster_relay import Durable
from bus.dlq import DeadLetter, DeadLetterReason, DeadLetters
from bus.entry_id import EntryId
from bus.errors import DeadLetterNotFoundError, DeadLetterRetryError
from bus.keys import Keys
from bus.routing import Router
from bus.settings import BusSettings
from manager.cli.entry_ids import check_entry_id
from manager.cli.output import echo_json, echo_table, shorten
from manager.cli.redis_access import bus_options, bus_settings, open_redis, run

_PAGE = 100
_ERROR_WIDTH = 60


@click.group()
def dlq() -> None:
    """List, show, retry and purge dead letters (events no handler could take).

    A dead letter keeps the original entry, the reason, the error and its traceback.
    Retrying re-delivers the event to the consumer group (and handler) that failed it only.
    """


def _dead_letters(redis: Redis, settings: BusSettings) -> DeadLetters:
    router = Router.of(settings)
    durable = Durable.of(settings)
    return DeadLetters(redis, Keys(settings.namespace), router, durable=durable)


def _not_found(ids: Sequence[str]) -> click.ClickException:
    return click.ClickException(
        f"dead letter(s) not found: {', '.join(ids)}: they were retried or purged already; "
        "see the ones left with `multibot dlq list`"
    )


# -- list / show ---------------------------------------------------------------------------


@dlq.command("list")
@click.option(
    "--count", type=click.IntRange(min=1), default=_PAGE, show_default=True, metavar="N",
    help="List at most N.",
)  # fmt: skip
@click.option("--after", metavar="ID", callback=check_entry_id, help="Start after this id.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as a JSON array.")
@bus_options
def list_(
    *, count: int, after: str | None, as_json: bool, redis_url: str | None, namespace: str
) -> None:
    """List dead letters, oldest first."""
    settings = bus_settings(redis_url, namespace)
    letters = run(settings, _list(settings, count + 1, after or "-"))
    more = len(letters) > count
    letters = letters[:count]
    if as_json:
        echo_json([letter.to_json() for letter in letters])
    elif not letters:
        click.echo("No dead letters.")
    else:
        headers = ("id", "failed_at", "reason", "group", "handler", "type", "error")
        echo_table(headers, [_row(letter) for letter in letters])
    if more:
        click.echo(f"More follow: multibot dlq list --after {letters[-1].id}", err=True)


def _row(letter: DeadLetter) -> list[str]:
    return [
        letter.id,
        letter.failed_at[:19] + "Z" if len(letter.failed_at) > 19 else letter.failed_at,
        letter.reason,
        letter.group,
        letter.handler,
        letter.fields.get("type", ""),
        shorten(letter.error, _ERROR_WIDTH),
    ]


async def _list(settings: BusSettings, count: int, after: str) -> list[DeadLetter]:
    async with open_redis(settings) as redis:
        return await _dead_letters(redis, settings).list(count=count, after=after)


@dlq.command()
@click.argument("dlq_id", metavar="ID", callback=check_entry_id)
@click.option("--json", "as_json", is_flag=True, help="Print it as a JSON object.")
@bus_options
def show(*, dlq_id: str, as_json: bool, redis_url: str | None, namespace: str) -> None:
    """Show one dead letter: why it failed, the traceback and the original entry."""
    settings = bus_settings(redis_url, namespace)
    letter = run(settings, _get(settings, dlq_id))
    if letter is None:
        raise _not_found([dlq_id])
    if as_json:
        echo_json(letter.to_json())
        return
    doc = letter.to_json()
    fields, traceback = doc.pop("fields"), doc.pop("traceback")
    width = max(map(len, doc))
    for name, value in doc.items():
        text = str(value).rstrip().replace("\n", "\n" + " " * (width + 2))
        click.echo(f"{name + ':':<{width + 2}}{text}")
    click.echo("fields:")
    for name, value in fields.items():
        click.echo(f"  {name}: {value}".rstrip())
    click.echo("traceback:" + ("" if traceback else " (none)"))
    for line in traceback.rstrip().splitlines():
        click.echo(f"  {line}")


async def _get(settings: BusSettings, dlq_id: str) -> DeadLetter | None:
    async with open_redis(settings) as redis:
        try:
            return await _dead_letters(redis, settings).get(dlq_id)
        except DeadLetterNotFoundError:
            return None


# -- retry / purge -------------------------------------------------------------------------


def _check_selection(ids: Sequence[str], all_: bool, verb: str) -> None:
    if ids and all_:
        raise click.UsageError(f"give dead-letter ids or --all to {verb}, not both")
    if not ids and not all_:
        raise click.UsageError(
            f"name the dead letters to {verb} (ids from `multibot dlq list`) or pass --all"
        )


@dlq.command()
@click.argument("ids", nargs=-1, metavar="[ID]...", callback=check_entry_id)
@click.option("--all", "all_", is_flag=True, help="Retry every dead letter (or those filtered).")
@click.option(
    "--reason",
    type=click.Choice([str(r) for r in DeadLetterReason]),
    help="With --all: only those dead-lettered for this reason.",
)
@click.option("--group", metavar="GROUP", help="With --all: only those of this consumer group.")
@click.option("--json", "as_json", is_flag=True, help="Print the re-deliveries as JSON.")
@bus_options
def retry(
    *,
    ids: tuple[str, ...],
    all_: bool,
    reason: str | None,
    group: str | None,
    as_json: bool,
    redis_url: str,
    namespace: str,
) -> None:
    """Re-deliver dead letters to the group that failed them; print the new entry ids.

    Each event goes back on its stream marked for that group (and handler) alone, and
    leaves the dead-letter stream.
    """
    _check_selection(ids, all_, "retry")
    if (reason or group) and not all_:
        raise click.UsageError("--reason and --group narrow --all; drop them when naming ids")
    settings = bus_settings(redis_url, namespace)
    done, missing, refused = run(settings, _retry(settings, ids or None, reason, group))
    if as_json:
        echo_json([{"dlq_id": d, "stream": s, "entry_id": e} for d, s, e in done])
    else:
        for dlq_id, stream, entry_id in done:
            click.echo(f"{dlq_id} -> {stream} {entry_id}")
        if all_ and not done and not refused:
            click.echo("No dead letters to retry.")
    for problem in refused:
        click.echo(f"error: {problem}", err=True)
    if missing:
        raise _not_found(missing)
    if refused:
        raise click.ClickException(f"{len(refused)} dead letter(s) refused (kept): see above")


Retried = list[tuple[str, str, str]]


async def _retry(
    settings: BusSettings, ids: Sequence[str] | None, reason: str | None, group: str | None
) -> tuple[Retried, list[str], list[str]]:
    """Retry the given dead letters, or all (filtered) when ``ids`` is None; (done, missing,
    why each refused one was refused)."""
    done: Retried = []
    missing: list[str] = []
    refused: list[str] = []
    async with open_redis(settings) as redis:
        dead = _dead_letters(redis, settings)
        if ids is None:
            done = await _retry_all(dead, redis, reason, group, refused)
        for dlq_id in ids or ():
            try:
                letter = await dead.get(dlq_id)
                done.append((dlq_id, letter.stream, await dead.retry(dlq_id)))
            except DeadLetterNotFoundError:
                missing.append(dlq_id)
            except DeadLetterRetryError as exc:
                refused.append(str(exc))
        await _audit(
            redis, settings, "dlq.retry", ids, [d for d, _, _ in done], missing=missing,
            refused=refused, reason=reason, group=group,
        )  # fmt: skip
    return done, missing, refused


async def _retry_all(
    dead: DeadLetters, redis: Redis, reason: str | None, group: str | None, refused: list[str]
) -> Retried:
    done: Retried = []
    # Stop at the last dead letter of now: an event failing again while we go is not
    # retried a second time in the same run.
    last: Any = await redis.xrevrange(dead.key, "+", "-", count=1)
    if not last:
        return done
    end = EntryId.parse(last[0][0])
    after = "-"
    while page := await dead.list(count=_PAGE, after=after):
        for letter in page:
            if EntryId.parse(letter.id) > end:
                return done
            after = letter.id
            if (reason and letter.reason != reason) or (group and letter.group != group):
                continue
            try:
                done.append((letter.id, letter.stream, await dead.retry(letter.id)))
            except DeadLetterNotFoundError:
                continue  # retried or purged by someone else meanwhile
            except DeadLetterRetryError as exc:
                refused.append(str(exc))
    return done


@dlq.command()
@click.argument("ids", nargs=-1, metavar="[ID]...", callback=check_entry_id)
@click.option("--all", "all_", is_flag=True, help="Delete every dead letter of the namespace.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting them all.")
@bus_options
def purge(
    *, ids: tuple[str, ...], all_: bool, yes: bool, redis_url: str | None, namespace: str
) -> None:
    """Delete dead letters for good (the named ones, or --all after confirmation)."""
    _check_selection(ids, all_, "purge")
    settings = bus_settings(redis_url, namespace)
    if all_:
        total = run(settings, _count(settings))
        if total == 0:
            click.echo("No dead letters.")
            return
        if not yes:
            click.confirm(
                f"Delete all {total} dead letters of namespace {settings.namespace!r}?",
                abort=True,
            )
    purged, missing = run(settings, _purge(settings, ids or None))
    click.echo(f"Purged {purged} dead letter(s).")
    if missing:
        raise _not_found(missing)


async def _count(settings: BusSettings) -> int:
    async with open_redis(settings) as redis:
        return await _dead_letters(redis, settings).count()


async def _purge(settings: BusSettings, ids: Sequence[str] | None) -> tuple[int, list[str]]:
    """Delete the given dead letters, or all when ``ids`` is None; (deleted, missing)."""
    async with open_redis(settings) as redis:
        dead = _dead_letters(redis, settings)
        if ids is None:
            purged = await dead.purge()
            await _audit(redis, settings, "dlq.purge", None, [], count=purged)
            return purged, []
        async with redis.pipeline(transaction=False) as pipe:
            for dlq_id in ids:
                pipe.xrange(dead.key, dlq_id, dlq_id, count=1)
            found: list[Any] = await pipe.execute()
        present = [dlq_id for dlq_id, rows in zip(ids, found, strict=True) if rows]
        missing = [dlq_id for dlq_id, rows in zip(ids, found, strict=True) if not rows]
        purged = await dead.purge(present)
        await _audit(redis, settings, "dlq.purge", ids, present, missing=missing, count=purged)
        return purged, missing


async def _audit(
    redis: Redis,
    settings: BusSettings,
    action: str,
    ids: Sequence[str] | None,
    done: Sequence[str],
    *,
    missing: Sequence[str] = (),
    refused: Sequence[str] = (),
    **more: Any,
) -> None:
    """Record the operator's action in the audit log, as the OS user running the CLI."""
    from manager.audit import os_actor, record  # noqa: PLC0415 - only the writes need it

    problems = [*(f"{m}: not found" for m in missing), *refused]
    detail = {"done": list(done[:100]), "count": len(done), **more}
    if problems:
        detail["problems"] = problems[:100]
    await record(
        redis, Keys(settings.namespace), actor=os_actor(), channel="cli", action=action,
        target="all" if ids is None else ",".join(ids[:20]), detail=detail,
        outcome="refused" if problems and not done else "ok",
        error="; ".join(problems[:5]) or None,
    )  # fmt: skip
