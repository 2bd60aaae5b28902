"""multibot's event bus on Redis Streams: what a bot needs to publish and consume.

A bot's ``main(bus)`` gets a ready :class:`BusClient`; the names here are what its code
uses: the client, events and their types, conditions, the errors it catches, dead letters,
the schema registry and the standard schemas the example bots parse. Settings are built by
the manager (or a standalone script) from ``bus.settings``, not here.

The names below are imported on first use (PEP 562), so ``import bus.errors`` or a command
line tool that needs one module does not pay for the whole bus (pydantic models, redis-py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.catalog import LoadBalanceRequired, SharedUserDetected, UserMessage
    from bus.client import BusClient
    from bus.conditions import Where
    from bus.dlq import DeadLetter, DeadLetterReason, DeadLetters
    from bus.errors import (
        BusBackpressureError,
        BusConnectionError,
        BusDurabilityError,
        BusError,
        DeadLetterNotFoundError,
        EventValidationError,
        PublishError,
        SchemaError,
        SubscriptionError,
    )
    from bus.event import Event
    from bus.event_types import EventType
    from bus.schemas import SchemaRegistry

#: Each exported name and the module that defines it.
_HOMES = {
    "BusBackpressureError": "bus.errors",
    "BusClient": "bus.client",
    "BusConnectionError": "bus.errors",
    "BusDurabilityError": "bus.errors",
    "BusError": "bus.errors",
    "DeadLetter": "bus.dlq",
    "DeadLetterNotFoundError": "bus.errors",
    "DeadLetterReason": "bus.dlq",
    "DeadLetters": "bus.dlq",
    "Event": "bus.event",
    "EventType": "bus.event_types",
    "EventValidationError": "bus.errors",
    "LoadBalanceRequired": "bus.catalog",
    "PublishError": "bus.errors",
    "SchemaError": "bus.errors",
    "SchemaRegistry": "bus.schemas",
    "SharedUserDetected": "bus.catalog",
    "SubscriptionError": "bus.errors",
    "UserMessage": "bus.catalog",
    "Where": "bus.conditions",
}

__all__ = [
    "BusBackpressureError",
    "BusClient",
    "BusConnectionError",
    "BusDurabilityError",
    "BusError",
    "DeadLetter",
    "DeadLetterNotFoundError",
    "DeadLetterReason",
    "DeadLetters",
    "Event",
    "EventType",
    "EventValidationError",
    "LoadBalanceRequired",
    "PublishError",
    "SchemaError",
    "SchemaRegistry",
    "SharedUserDetected",
    "SubscriptionError",
    "UserMessage",
    "Where",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'bus' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
