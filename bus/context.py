"""The event being handled in the current task, for automatic correlation."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bus.event import Event

current_event: ContextVar[Event | None] = ContextVar("multibot_current_event", default=None)


def correlation_for(
    explicit_correlation: str | None, explicit_causation: str | None
) -> tuple[str | None, str | None]:
    """Correlation and causation ids for a new event published in the current context.

    Inside a handler, the new event joins the handled event's chain: its correlation id is the
    handled event's (or the handled event's id when it started the chain) and its causation id
    is the handled event's id. Explicit values always win.
    """
    parent = current_event.get()
    if parent is None:
        return explicit_correlation, explicit_causation
    return (
        explicit_correlation or parent.correlation_id or parent.id,
        explicit_causation or parent.id,
    )
