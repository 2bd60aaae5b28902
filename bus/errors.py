"""Errors raised by the bus. Every message says what to do about it."""

from __future__ import annotations


class BusError(Exception):
    """Root of every error the bus raises."""


class EventValidationError(BusError, ValueError):
    """An event (or its data) breaks a rule; the message names the field and the rule."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class SchemaError(EventValidationError):
    """The data of an event does not match the schema registered for its type."""


class WireFormatError(BusError):
    """A stream entry does not decode into an event (written by a foreign or broken producer)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed stream entry: {reason}")
        self.reason = reason


class EntryIdRangeError(BusError, ValueError):
    """A stream entry id of the right form with a part beyond 2^64-1, which Redis refuses."""


class BusConnectionError(BusError, ConnectionError):
    """Redis could not be reached within the bounded retry; the operation did not happen."""


class PublishError(BusError):
    """An event could not be published; nothing was written for it unless the message says so."""


class SubscriptionError(BusError, ValueError):
    """A subscription is declared wrongly (bad pattern, condition or options)."""


class GroupMissingError(BusError):
    """A consumer group does not exist and this client may not create it: a bot's Redis user
    leaves creating groups to the manager, which creates every declared one before the bot
    starts and again after Redis lost them."""


class DeadLetterRetryError(BusError, ValueError):
    """A dead letter cannot be retried where it says (a stream its event is not routed to,
    or a key that is not a stream); nothing was written and the letter is kept."""


class DeadLetterNotFoundError(BusError, KeyError):
    """A dead-letter entry id does not exist (already retried or purged)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "dead-letter entry not found"


class HandlerTimeoutError(BusError, TimeoutError):
    """A handler ran past its subscription's timeout and was cancelled (a failed attempt)."""

    def __init__(self, handler: str, timeout: float) -> None:
        super().__init__(
            f"handler {handler} ran past its timeout of {timeout:g}s and was cancelled: make it "
            "faster, or raise the timeout (subscribe(timeout=...) or consumer.handler_timeout)"
        )
        self.timeout = timeout


class FencedError(BusError):
    """This replica's lease is no longer valid: it must not act (another may be active)."""


class BusBackpressureError(PublishError):
    """Redis is close to its memory limit and cannot take more events yet; nothing was written.

    Raised by ``publish`` once the bounded wait (``bus.publish.backpressure_wait``) is over,
    or at once when Redis itself refuses the write (OOM under ``noeviction``). ``reason``
    says what holds the memory (the archive is down, a group is behind). Publish again
    later: the condition clears as soon as the archiver and the slow groups catch up.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class BusDurabilityError(PublishError):
    """The primary has the event(s) but fewer replicas than ``publish_replicas`` confirmed
    them within ``publish_replicas_timeout``: a failover now could lose them.

    The events were written, and usually reach the replicas moments later. Publishing again
    is safe for consumers that deduplicate by event id (every handler should); otherwise
    log it and go on. ``acknowledged`` is how many replicas did confirm.
    """

    def __init__(self, message: str, acknowledged: int) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged
