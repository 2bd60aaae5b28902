"""multibot's event bus on Redis Streams: what a bot needs to publish and consume."""

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
