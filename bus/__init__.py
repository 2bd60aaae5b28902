"""multibot's event bus on Redis Streams: what a bot needs to publish and consume.

The names below are imported on first use (PEP 562), so ``import bus.errors`` or a command
line tool that needs one module does not pay for the whole bus (pydantic models, redis-py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.catalog import EventType
    from bus.client import BusClient
    from bus.conditions import Where
    from bus.dlq import DeadLetter, DeadLetterReason, DeadLetters
    from bus.errors import (
        BusBackpressureError,
        BusConnectionError,
        BusError,
        DeadLetterNotFoundError,
        EventValidationError,
        PublishError,
        SchemaError,
        SubscriptionError,
        WireFormatError,
    )
    from bus.event import Event
    from bus.settings import BreakerSettings, BusSettings, ConsumerSettings, RetrySettings

#: Each exported name and the module that defines it.
_HOMES = {
    "BreakerSettings": "bus.settings",
    "BusBackpressureError": "bus.errors",
    "BusClient": "bus.client",
    "BusConnectionError": "bus.errors",
    "BusError": "bus.errors",
    "BusSettings": "bus.settings",
    "ConsumerSettings": "bus.settings",
    "DeadLetter": "bus.dlq",
    "DeadLetterNotFoundError": "bus.errors",
    "DeadLetterReason": "bus.dlq",
    "DeadLetters": "bus.dlq",
    "Event": "bus.event",
    "EventType": "bus.catalog",
    "EventValidationError": "bus.errors",
    "PublishError": "bus.errors",
    "RetrySettings": "bus.settings",
    "SchemaError": "bus.errors",
    "SubscriptionError": "bus.errors",
    "Where": "bus.conditions",
    "WireFormatError": "bus.errors",
}

__all__ = [
    "BreakerSettings",
    "BusBackpressureError",
    "BusClient",
    "BusConnectionError",
    "BusError",
    "BusSettings",
    "ConsumerSettings",
    "DeadLetter",
    "DeadLetterNotFoundError",
    "DeadLetterReason",
    "DeadLetters",
    "Event",
    "EventType",
    "EventValidationError",
    "PublishError",
    "RetrySettings",
    "SchemaError",
    "SubscriptionError",
    "Where",
    "WireFormatError",
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
