"""``/v1/events/{id}/deliveries``: what each group did with an archived event."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from bus.archive.deliveries import GroupTrail
from manager.api.context import view_of
from manager.api.errors import ERRORS
from manager.api.events import archive_of, archived_event
from manager.api.models import EventOut
from manager.api.security import Reader

router = APIRouter(tags=["events"])


class DeliveryOut(BaseModel):
    """One outcome of one delivery, as its consumer reported it with its ack."""

    consumer: str
    outcome: str = Field(description="handled, dead_lettered, skipped (where), retried")
    attempts: int = Field(description="times Redis had delivered it to the group")
    entry_id: str = Field(description="the stream entry delivered")
    read_at: datetime
    done_at: datetime
    handler_ms: float
    previous_consumer: str | None = Field(description="the consumer it was taken over from")
    dead_letter_retry: bool = Field(description="sent to this group alone by a DLQ retry")


class DeadLetterRef(BaseModel):
    """A dead letter the group wrote for the event."""

    dlq_id: str
    attempts: int
    reason: str
    error: str
    consumer: str
    handler: str
    failed_at: datetime | None


class GroupDeliveries(BaseModel):
    """One group that received the event or should have."""

    group: str
    expected: bool = Field(description="it declared a matching subscription at the time")
    status: str = Field(
        description="handled, dead_lettered, skipped, pending (delivered, no final "
        "outcome yet) or 'not handled' (expected, nothing recorded)"
    )
    outcomes: list[DeliveryOut]
    dead_letters: list[DeadLetterRef]


class EventDeliveries(BaseModel):
    """An archived event and every group's part in it, by group name."""

    event: EventOut
    groups: list[GroupDeliveries]


def group_out(trail: GroupTrail) -> GroupDeliveries:
    """The API's form of a group's trail."""
    data: dict[str, Any] = trail.as_json()
    return GroupDeliveries.model_validate(data)


@router.get(
    "/v1/events/{event_id}/deliveries",
    response_model=EventDeliveries,
    responses=ERRORS,
    summary="What each consumer group did with an archived event",
)
async def deliveries(request: Request, _: Reader, event_id: str) -> EventDeliveries:
    """Every group that handled, skipped, retried or dead-lettered the event, and every
    group that should have received it (by the subscriptions declared when it was
    published) and has nothing recorded: status ``not handled``."""
    store = await archive_of(request)
    event = await archived_event(store, event_id)
    trails = await store.deliveries.trail(event.id, event.timestamp, event.type)
    keys = view_of(request).bus.keys
    stream = keys.stream_name(event.stream) if event.stream else None
    return EventDeliveries(event=EventOut.of(event, stream), groups=[group_out(t) for t in trails])
