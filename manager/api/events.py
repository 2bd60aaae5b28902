"""``/v1/events`` and ``/v1/traces``: publish, query the archive, follow a chain."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response

from bus import Event
from bus.archive import ArchiveStore
from bus.keys import Keys
from manager.api.context import view_of
from manager.api.errors import ERRORS
from manager.api.models import (
    MAX_BATCH,
    EventIn,
    EventOut,
    EventPage,
    Published,
    Trace,
    TraceNode,
)
from manager.api.publishing import publish_body
from manager.api.security import Publisher, Reader
from manager.archive.trace_tree import chain_tree
from manager.times import TimeRangeError, duration_ago, utc_moment

router = APIRouter(tags=["events"])

_ONE = EventIn.model_json_schema()
_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    _ONE,
                    {"type": "array", "items": _ONE, "minItems": 1, "maxItems": MAX_BATCH},
                ]
            }
        }
    },
}


@router.post(
    "/v1/events",
    status_code=202,
    response_model=Published,
    responses=ERRORS,
    openapi_extra={"requestBody": _BODY},
    summary="Publish one event (an object) or a batch (an array, all or none)",
)
async def publish(request: Request, caller: Publisher) -> Response:
    """Validated as the library validates; a batch is published only if every item is
    valid, else the 422 lists each bad item by its index."""
    # The lean route (manager.api.ingest) answers these requests in front of this one,
    # which describes them in the OpenAPI document and answers the same when reached.
    ids = await publish_body(view_of(request), caller, request.body)
    return Response(orjson.dumps({"ids": ids}), 202, media_type="application/json")


async def archive_of(request: Request) -> ArchiveStore:
    """The manager's archive store; 503 when it keeps none."""
    store = await view_of(request).archive()
    if store is None:
        raise HTTPException(
            503, "this manager keeps no archive (PostgreSQL): events can only be tailed"
        )
    return store


def _out(event: Event, keys: Keys) -> EventOut:
    return EventOut.of(event, keys.stream_name(event.stream) if event.stream else None)


def moment_param(value: str | None, name: str) -> datetime | None:
    """A ``since``/``until``: a time (naive is UTC) or a duration back from now; 422
    saying the accepted forms and ranges otherwise."""
    if value is None:
        return None
    try:
        return duration_ago(value) or utc_moment(datetime.fromisoformat(value))
    except TimeRangeError as exc:
        raise HTTPException(422, f"{name}: {exc}; leave {name} out for no bound") from None
    except ValueError:
        raise HTTPException(
            422,
            f"{name}={value!r} is neither a time (2026-11-27T10:00:00Z) nor a duration "
            "back from now (30s, 10m, 2h, 1d)",
        ) from None


def check_text(value: str, name: str) -> None:
    """422 for an id PostgreSQL cannot hold as text (it would refuse the query)."""
    if "\x00" in value:
        raise HTTPException(
            422,
            f"{name} contains a NUL character, which no archived id has: pass the id as "
            "the API or the bus gave it",
        )


@router.get(
    "/v1/events",
    response_model=EventPage,
    responses=ERRORS,
    summary="Query the archive, a page at a time",
)
async def query(
    request: Request,
    _: Reader,
    *,
    type: Annotated[list[str], Query(description="type patterns (* one segment, # any)")] = [],  # noqa: B006
    source: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[str | None, Query(description="a time or a duration back (2h)")] = None,
    until: Annotated[str | None, Query(description="a time or a duration back")] = None,
    where: Annotated[
        str | None, Query(description='data conditions, JSON: {"n": {"gt": 1}}')
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> EventPage:
    conditions = None
    if where is not None:
        try:
            conditions = orjson.loads(where)
        except orjson.JSONDecodeError:
            raise HTTPException(
                422, f'where={where!r} is not JSON: pass an object like {{"user_id": 42}}'
            ) from None
        if not isinstance(conditions, dict):
            raise HTTPException(422, "where must be a JSON object of conditions")
    store = await archive_of(request)
    try:
        events, next_cursor = await store.query(
            types=type,
            source=source,
            since=moment_param(since, "since"),
            until=moment_param(until, "until"),
            where=conditions,
            after=cursor,
            limit=limit,
        )
    except (ValueError, TypeError) as exc:  # a bad pattern or condition
        raise HTTPException(422, str(exc)) from None
    keys = view_of(request).bus.keys
    return EventPage(events=[_out(e, keys) for e in events], next_cursor=next_cursor)


@router.get(
    "/v1/events/{event_id}", response_model=EventOut, responses=ERRORS, summary="One archived event"
)
async def get_event(request: Request, _: Reader, event_id: str) -> EventOut:
    event = await archived_event(await archive_of(request), event_id)
    return _out(event, view_of(request).bus.keys)


async def archived_event(store: ArchiveStore, event_id: str) -> Event:
    """The archived event with this id; 422 for an id no event can have, 404 for none."""
    check_text(event_id, "the event id")
    event = await store.get(event_id)
    if event is None:
        raise HTTPException(
            404,
            f"no archived event has id {event_id!r} (archiving takes "
            "a moment; older than the retention is gone)",
        )
    return event


@router.get(
    "/v1/traces/{correlation_id}",
    response_model=Trace,
    responses=ERRORS,
    summary="A correlation chain as a tree by causation, depth-first with parent ids",
)
async def trace(request: Request, _: Reader, correlation_id: str) -> Trace:
    """Every event of the chain once, depth-first, each with ``parent_id`` and ``depth``:
    flat, so a chain of any depth is answered."""
    check_text(correlation_id, "the correlation id")
    store = await archive_of(request)
    chain = await store.trace(correlation_id)
    if not chain:
        raise HTTPException(404, f"no archived event has correlation id {correlation_id!r}")
    keys = view_of(request).bus.keys
    nodes = [
        TraceNode(**_out(node.event, keys).model_dump(), parent_id=node.parent_id, depth=node.depth)
        for node in chain_tree(chain)
    ]
    return Trace(correlation_id=correlation_id, events=len(nodes), nodes=nodes)
