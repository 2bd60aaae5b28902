"""``multibot events``: publish an event, or watch events as they go by."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import click
import orjson
import structlog
from redis.asyncio import Redis

from bus.conditions import Where
from bus.connection import is_cluster, raise_swallowed_cancel
from bus.entry_id import MAX_PART, EntryId
from bus.errors import (
    EntryIdRangeError,
    EventValidationError,
    SubscriptionError,
    WireFormatError,
)
from bus.event import Event
from bus.keys import Keys
from bus.patterns import Pattern
from bus.publisher import Publisher
from bus.replay import replay, stream_id_at
from bus.routing import Router
from bus.schemas import SchemaRegistry
from bus.settings import BusSettings
from bus.stream_watch import StreamWatch
from bus.wire import decode, format_timestamp
from manager.cli.lazy import LazyGroup
from manager.cli.output import echo_json
from manager.cli.redis_access import bus_options, bus_settings, open_redis, run
from manager.times import TimeRangeError, duration_ago, utc_moment

log = structlog.get_logger("manager.cli")

#: The longest duration back from now a ``since`` takes, in days (about a hundred years).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Which option or argument each field of an EventValidationError comes from.
_PARAM_OF_FIELD = {"type": "'TYPE'", "data": "'--data'", "key": "'--key'", "source": "'--source'"}


#: The archive's commands, imported when used (they load the PostgreSQL driver).
ARCHIVE_COMMANDS = {
    "query": (
        "manager.cli.archive:query",
        "Archived events (all 7 days of them), oldest first, by type, source, time and data.",
    ),
    "trace": (
        "manager.cli.archive:trace",
        "A correlation chain from the archive, as a tree by causation, with deliveries.",
    ),
    "show": (
        "manager.cli.event_show:show",
        "An archived event and what each consumer group did with it.",
    ),
}


@click.group(cls=LazyGroup, lazy=ARCHIVE_COMMANDS)
def events() -> None:
    """Publish events on the bus and watch them go by."""


# -- publish -------------------------------------------------------------------------------


def _json_object(text: str, param_hint: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=param_hint) from None


@events.command()
@click.argument("type_", metavar="TYPE")
@click.option(
    "--data",
    "data_text",
    metavar="JSON",
    default="{}",
    help='Event data, a JSON object like \'{"user_id": 42}\'; "-" reads it from stdin.',
)
@click.option("--key", help="Ordering key: events with the same key are handled in order.")
@click.option("--source", default="cli", show_default=True, help="Who publishes the event.")
@click.option("--correlation-id", metavar="ID", help="Join an existing correlation chain.")
@click.option("--json", "as_json", is_flag=True, help="Print id, stream and entry id as JSON.")
@bus_options
def publish(
    *,
    type_: str,
    data_text: str,
    key: str | None,
    source: str,
    correlation_id: str | None,
    as_json: bool,
    redis_url: str | None,
    namespace: str,
) -> None:
    """Publish one event of type TYPE (like user.message.received) and print its id.

    The event is checked like a bot's publish (type, data size, the standard schemas)
    before anything is sent.
    """
    settings = bus_settings(redis_url, namespace)
    if data_text == "-":
        data_text = sys.stdin.read()
    data = _json_object(data_text, "'--data'")
    try:
        stream, entry_id, event = run(
            settings, _publish(settings, type_, data, key, source, correlation_id)
        )
    except EventValidationError as exc:
        hint = _PARAM_OF_FIELD.get(exc.field, exc.field)
        raise click.BadParameter(str(exc).removeprefix(f"{exc.field}: "), param_hint=hint) from None
    if as_json:
        echo_json({"id": event.id, "type": event.type, "stream": stream, "entry_id": entry_id})
    else:
        click.echo(event.id)


async def _publish(  # noqa: PLR0917 - the command's options, passed straight through
    settings: BusSettings,
    type_: str,
    data: Any,
    key: str | None,
    source: str,
    correlation_id: str | None,
) -> tuple[str, str, Event]:
    async with open_redis(settings) as redis:
        schemas = SchemaRegistry(strict=settings.strict_schemas)
        publisher = Publisher(redis, settings, schemas, source)
        event = publisher.event(type_, data, key=key, correlation_id=correlation_id)
        entry_id = await publisher.publish(event)
        return publisher.stream_key(event.type, event.key), entry_id, event


# -- tail ----------------------------------------------------------------------------------


def _since_id(value: str) -> str | None:
    """``--since``: None for "now", else the inclusive stream id to start from."""
    text = value.strip()
    if text == "now":
        return None
    try:
        EntryId.parse(text)
    except EntryIdRangeError:
        raise click.BadParameter(
            f"{value!r} is out of range: both parts of a stream entry id are at most "
            f"{MAX_PART} (64 bits); give 0 for everything still in Redis",
            param_hint="'--since'",
        ) from None
    except ValueError:
        pass  # not an id: a time or a duration
    else:
        return text  # Redis takes the id as it was written
    try:
        moment = duration_ago(text) or utc_moment(datetime.fromisoformat(text))
    except TimeRangeError as exc:
        raise click.BadParameter(
            f"{exc}: give 0 for everything still in Redis", param_hint="'--since'"
        ) from None
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use 'now', a stream entry id (1700000000000-0, or 0 for everything), "
            "a time (2026-11-26T22:40:00Z; UTC when no offset) or a duration (30s, 10m, 2h, 1d)",
            param_hint="'--since'",
        ) from None
    # Stream ids start at 1970: any time before that means everything still in Redis.
    return "0" if moment < _EPOCH else stream_id_at(moment, "-")


def _pattern(ctx: click.Context, param: click.Parameter, value: str) -> Pattern:
    try:
        return Pattern(value)
    except SubscriptionError as exc:
        raise click.BadParameter(str(exc)) from None


def _where(ctx: click.Context, param: click.Parameter, value: str | None) -> Where | None:
    if value is None:
        return None
    spec = _json_object(value, "'--where'")
    if not isinstance(spec, dict):
        raise click.BadParameter("must be a JSON object of conditions", param_hint="'--where'")
    try:
        return Where(spec)
    except SubscriptionError as exc:
        raise click.BadParameter(str(exc), param_hint="'--where'") from None


@events.command()
@click.argument("pattern", callback=_pattern)
@click.option(
    "--where",
    metavar="JSON",
    callback=_where,
    help='Conditions on the data, like \'{"lang": "en"}\' or \'{"age": {"gte": 18}}\'.',
)
@click.option(
    "--since",
    default="now",
    show_default=True,
    metavar="ID|TIME|DURATION|now",
    help="First print the events still in Redis since this entry id (0: all), UTC time or "
    "duration ago (10m), then follow new ones.",
)
@click.option(
    "--count", type=click.IntRange(min=1), metavar="N", help="Exit after N matching events."
)
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON line.")
@bus_options
def tail(
    *,
    pattern: Pattern,
    where: Where | None,
    since: str,
    count: int | None,
    as_json: bool,
    redis_url: str | None,
    namespace: str,
) -> None:
    """Print events whose type matches PATTERN as they arrive, until Ctrl-C.

    PATTERN is dotted, '*' matching one segment and '#' any number: 'user.message.*',
    'bot.#', '#'. Tailing only reads: it joins no consumer group and acknowledges nothing,
    so the bots see every event as before.
    """
    settings = bus_settings(redis_url, namespace)
    watch = _Tail(settings, pattern, where, since, count, as_json)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a tail ends
        run(settings, watch.run())


def event_json(event: Event) -> dict[str, Any]:
    """An event read from Redis as a JSON-ready dict."""
    return {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "timestamp": format_timestamp(event.timestamp),
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "version": event.version,
        "key": event.key,
        "data": dict(event.data),
        "stream": event.stream,
        "entry_id": event.entry_id,
    }


class _Tail:
    """Reads the streams a pattern routes to with plain XREAD: an observer, not a consumer."""

    def __init__(  # noqa: PLR0917 - the command's options, passed straight through
        self,
        settings: BusSettings,
        pattern: Pattern,
        where: Where | None,
        since: str,
        count: int | None,
        as_json: bool,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.router = Router.of(settings)
        self.pattern = pattern
        self.where = where
        self.since_text = since
        self.since = _since_id(since)
        self.left = count
        self.as_json = as_json
        self.streams = sorted(self.keys.stream(s) for s in self.router.streams_for(pattern))
        #: Set by Ctrl-C.
        self.interrupted = False
        #: On a cluster: the blocking reads per stream, kept between rounds.
        self._watch: StreamWatch | None = None

    async def run(self) -> None:
        """Print history (with ``since``), then new events, until ``count`` were printed or
        Ctrl-C. The interrupt is a flag as well as a cancel: redis-py on 3.11 can swallow a
        cancel that lands mid-command, and a tail must stop all the same."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def interrupt() -> None:
            self.interrupted = True
            if task is not None:
                task.cancel()

        loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            await self._run()
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    async def _run(self) -> None:
        async with open_redis(self.settings) as redis:
            # Each stream's last entry now: following starts after it (or after the last
            # event history printed), so nothing added from here on is missed or doubled.
            async with redis.pipeline(transaction=False) as pipe:
                for stream in self.streams:
                    pipe.xrevrange(stream, "+", "-", count=1)
                heads: list[Any] = await pipe.execute()
            positions = {
                s: rows[0][0] if rows else "0-0"
                for s, rows in zip(self.streams, heads, strict=True)
            }
            # Scripts (and the tests) may wait for this line: events added after it are shown.
            click.echo(
                f"Tailing {self.pattern.text} since {self.since_text} on "
                f"{', '.join(self.streams)} (Ctrl-C to stop)",
                err=True,
            )
            if self.since is not None:
                await self._history(redis, self.since, positions)
            try:
                while self.left != 0 and not self.interrupted:
                    await self._follow(redis, positions)
                    raise_swallowed_cancel()
            finally:
                if self._watch is not None:
                    self._watch.close()

    async def _history(self, redis: Redis, since: str, positions: dict[str, str]) -> None:
        history = replay(redis, self.keys, self.router, [self.pattern.text], since=since)
        async for event in history:
            raise_swallowed_cancel()
            stream, entry_id = str(event.stream), str(event.entry_id)
            if EntryId.parse(entry_id) > EntryId.parse(positions[stream]):
                positions[stream] = entry_id  # arrived during the replay: printed already
            self._show(event)
            if self.left == 0:
                return

    async def _follow(self, redis: Redis, positions: dict[str, str]) -> None:
        block_ms = self.settings.consumer.block_ms
        read_count = self.settings.consumer.read_count
        if is_cluster(redis):  # one XREAD per stream (slot); the watch blocks for them
            self._watch = self._watch or StreamWatch(redis, block_ms)
            ready, failed = await self._watch.ready(positions)
            if failed:
                raise next(iter(failed.values()))
            batches: Any = []
            for stream in ready:
                reply: Any = await redis.xread({stream: positions[stream]}, count=read_count)
                batches += reply.items() if isinstance(reply, dict) else reply or []
        else:
            reply = await redis.xread(positions, count=read_count, block=block_ms)  # type: ignore[arg-type]
            batches = reply.items() if isinstance(reply, dict) else reply or []
        got: list[Event] = []
        floor = EntryId.parse(self.since) if self.since is not None else (0, 0)
        for stream, entries in batches:
            for entry_id, fields in entries:
                positions[stream] = entry_id
                if EntryId.parse(entry_id) < floor:
                    continue
                try:
                    got.append(decode(fields, stream, entry_id))
                except WireFormatError as exc:
                    log.warning(
                        "skipping malformed entry",
                        stream=stream,
                        entry_id=entry_id,
                        reason=exc.reason,
                    )
        # One XREAD returns stream after stream; merge them as replay does: by the entry's
        # millisecond, then by event id (UUIDv7, monotonic per publisher).
        for event in sorted(got, key=lambda e: (EntryId.parse(str(e.entry_id))[0], e.id)):
            if self.pattern.matches(event.type):
                self._show(event)
                if self.left == 0:
                    return

    def _show(self, event: Event) -> None:
        if self.where is not None and not self.where.matches(event.data):
            return
        if self.as_json:
            echo_json(event_json(event), compact=True)
        else:
            data = orjson.dumps(dict(event.data), option=orjson.OPT_NON_STR_KEYS).decode()
            when = event.timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            click.echo(f"{when}  {event.type}  {event.source}  {event.id}  {data}")
        if self.left is not None:
            self.left -= 1
