"""A publish request's body turned into published events: parsed, each item validated as
the library validates it, all published or none, and recorded in the audit log.

Both the lean route (:mod:`manager.api.ingest`) and the FastAPI route that documents
``POST /v1/events`` answer with :func:`publish_body`, so their answers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import HTTPException
from pydantic import ValidationError

from bus import BusClient, Event
from bus.errors import EventValidationError
from manager.api.audited import audited_on
from manager.api.auth import Caller
from manager.api.context import ManagerView
from manager.api.models import MAX_BATCH, EventIn

#: Event ids an audit record of a publish lists (a batch's first ones; the count says all).
AUDITED_IDS = 100

#: A request's events with their index in it (for a 422 naming the bad ones).
Drafts = list[tuple[int, Event]]


#: What sends a request's events: ``BusClient.publish_many`` or one with its signature.
PublishMany = Callable[[list[Event]], Awaitable[list[str]]]


async def publish_body(
    view: ManagerView,
    caller: Caller,
    body: Callable[[], Awaitable[bytes]],
    publish_many: PublishMany | None = None,
) -> list[str]:
    """Read a request's ``body`` (an event object, or an array of 1 to ``MAX_BATCH``),
    publish it as ``caller`` (``source = api:<token name>``), all or none, with
    ``publish_many`` (by default the bus client's), and record that in the audit log
    (buffered); the ids in order. HTTPException 400 for a body that is not JSON, 422
    listing each bad item by index; what the bus raises otherwise."""
    async with audited_on(view, caller, "events.publish", buffered=True) as detail:
        items, single = _items(await body())
        bus = view.bus
        drafts, problems = _drafts(items, bus, caller)
        if problems:
            raise _invalid(single, problems + _checked(bus, drafts))
        try:
            # publish_many checks every draft against the registered schemas and the size
            # limit before it sends anything, so the happy path checks each event once.
            ids = await (publish_many or bus.publish_many)([draft for _, draft in drafts])
        except EventValidationError:  # nothing was sent: name every item that fails
            problems = _checked(bus, drafts)
            if not problems:
                raise
            raise _invalid(single, problems) from None
        detail.update(count=len(ids), ids=ids[:AUDITED_IDS])
    return ids


def _items(body: bytes) -> tuple[list[Any], bool]:
    """The items of the body, and whether it was a single object; 400 or 422 otherwise."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(
            400, f"the body is not valid JSON ({exc}): send an event object or an array of them"
        ) from None
    single = isinstance(parsed, dict)
    items = [parsed] if single else parsed
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise HTTPException(
            422, f"send one event as a JSON object or 1 to {MAX_BATCH} events as an array"
        )
    return items, single


def _drafts(
    items: list[Any], bus: BusClient, caller: Caller
) -> tuple[Drafts, list[dict[str, Any]]]:
    """Each item as an event (the API's model, then the library's type, data and key
    rules), and the problems of those that are not."""
    drafts: Drafts = []
    problems: list[dict[str, Any]] = []
    build = bus.event
    source = caller.source
    for index, item in enumerate(items):
        try:
            event = EventIn.model_validate(item)
            drafts.append((index, build(
                event.type, event.data, key=event.key, correlation_id=event.correlation_id,
                causation_id=event.causation_id, source=source, version=event.version,
            )))  # fmt: skip
        except ValidationError as exc:
            for e in exc.errors():
                loc = [str(p) for p in e["loc"]]
                problems.append({"index": index, "loc": loc, "message": e["msg"]})
        except EventValidationError as exc:
            problems.append({"index": index, "loc": [exc.field], "message": exc.reason})
    return drafts, problems


def _checked(bus: BusClient, drafts: Drafts) -> list[dict[str, Any]]:
    """The problems of ``drafts`` against the registered schemas and the size limit."""
    problems: list[dict[str, Any]] = []
    for index, draft in drafts:
        try:
            bus.check(draft)
        except EventValidationError as exc:
            problems.append({"index": index, "loc": [exc.field], "message": exc.reason})
    return problems


def _invalid(single: bool, problems: list[dict[str, Any]]) -> HTTPException:
    """The 422 naming each problem, in the order of the items (the first five in its text)."""
    problems.sort(key=lambda p: int(p["index"]))  # stable: an item's own order is kept
    where = "; ".join(
        ("" if single else f"[{p['index']}] ") + f"{'.'.join(p['loc'])}: {p['message']}"
        for p in problems[:5]
    )
    return HTTPException(
        422,
        {
            "error": f"not published, the event{' is' if single else 's are'} not valid: {where}",
            "detail": problems,
        },
    )
