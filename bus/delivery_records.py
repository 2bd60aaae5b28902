"""Delivery records: what one consumer did with each entry it took, sent with its acks.

For each entry whose outcome is final (handled, dead-lettered, skipped by its ``where``
conditions) or that it leaves pending for another try (retried), a consumer keeps one
record, and the :class:`~bus.acks.AckBatcher` writes all it holds as **one** outbox entry
(marked :data:`DELIVERIES_MARK`) with each XACK: never a write per event. The
manager's relay moves it to ``<ns>:deliveries`` stamped with the bot's group (a bot can
only speak for its own group), and the coordinator copies it into PostgreSQL's
``deliveries`` table (:mod:`bus.archive.deliveries`).

The records and the acks go in one MULTI/EXEC when one client writes both (one Redis
user for the bot's keys and its group, not a cluster): a consumer killed mid-flush leaves
both or neither. One killed before both leaves no record, and whoever takes the entry over
records it with the consumer it took it from and the delivery count. Where they cannot
share a transaction (a bot's own user writes its outbox and its streams user acks, or a
cluster), the records go out first: a consumer killed between the two has recorded an
outcome for an entry still pending, which is delivered again and recorded again (it was
handled twice). A stop never cuts a flush short (:meth:`bus.dispatcher.Dispatcher.finish`).
Records Redis refuses (out of memory, a read-only replica) are dropped with an error in
the bot's log, and the acks go on: the trail is worth less than handling every entry
once (an ack is no write Redis refuses when full, and withholding it would deliver the
entries again).

Wire format of the ``records`` field: a JSON array of arrays, one per entry::

    [outcome, event_id, created_at_us, entry_id, attempts, read_at_ms, done_at_ms,
     handler_ms, previous_consumer, retry]

``created_at_us`` is the event's timestamp in microseconds since the epoch (the archive's
``created_at``), ``previous_consumer`` the consumer it was reclaimed from ("" if none),
``retry`` 1 for an entry a dead-letter retry sent to this group alone.
"""

from __future__ import annotations

import enum
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

if TYPE_CHECKING:
    from bus.delivery import Delivery

log = structlog.get_logger("bus.delivery_records")

#: Field of an outbox entry that holds delivery records (the relay moves it to the
#: deliveries stream).
DELIVERIES_MARK = "outbox.deliveries"
#: Most records one outbox entry carries; a bigger flush is split.
MOST_PER_ENTRY = 2000
#: Records that go out in one outbox entry.
Chunk = list[list[Any]]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = datetime.resolution


class DeliveryOutcome(enum.StrEnum):
    """What one delivery of an entry to a group came to."""

    #: Every matching handler succeeded (or it was a duplicate run-once skipped).
    HANDLED = "handled"
    #: A handler (or the consumer: malformed, poison) dead-lettered it.
    DEAD_LETTERED = "dead_lettered"
    #: Its type matched a subscription but no subscription's ``where`` took it.
    SKIPPED = "skipped"
    #: Left pending (a dead letter Redis refused, a fenced replica, a bug): delivered again.
    RETRIED = "retried"


def micros(moment: datetime) -> int:
    """``moment`` in whole microseconds since the epoch (naive taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND


class DeliveryRecords:
    """The records one consumer has not sent yet, and how to send them."""

    __slots__ = ("_consumer", "_key", "_redis", "_waiting", "dropped", "sent")

    def __init__(self, redis: Redis, outbox: str, consumer: str) -> None:
        """``redis`` may XADD to ``outbox`` (the bot's own user)."""
        self._redis = redis
        self._key = outbox
        self._consumer = consumer
        self._waiting: list[list[Any]] = []
        #: Records written so far, and records Redis refused (dropped).
        self.sent = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, delivery: Delivery, outcome: DeliveryOutcome) -> None:
        """Keep the record of ``delivery`` (one decoded as an event; others have no id the
        archive could join on and are left to the dead-letter archive)."""
        event = delivery.event
        if event is None:
            return
        now = time.time()
        read_at = now - (time.monotonic() - delivery.taken_at)
        self._waiting.append(
            [
                outcome.value,
                event.id,
                micros(event.timestamp),
                delivery.entry_id,
                delivery.attempts,
                round(read_at * 1000, 3),
                round(now * 1000, 3),
                round(delivery.handler_s * 1000, 3),
                delivery.previous,
                1 if delivery.retry else 0,
            ]
        )

    @property
    def redis(self) -> Redis:
        """The client the records are written with."""
        return self._redis

    def take(self) -> list[Chunk]:
        """The waiting records in chunks of at most :data:`MOST_PER_ENTRY` (an outbox entry
        each), no longer waiting: :meth:`written`, :meth:`refused` or :meth:`put_back`
        settles each chunk."""
        waiting, self._waiting = self._waiting, []
        return [waiting[at : at + MOST_PER_ENTRY] for at in range(0, len(waiting), MOST_PER_ENTRY)]

    def queue(self, pipe: Pipeline, chunk: Chunk) -> None:
        """Queue the XADD of ``chunk``'s outbox entry on ``pipe``."""
        pipe.xadd(self._key, self._fields(chunk))

    def written(self, chunk: Chunk) -> None:
        """``chunk`` is in the outbox."""
        self.sent += len(chunk)

    def refused(self, chunks: list[Chunk], exc: ResponseError) -> None:
        """Redis refused ``chunks`` (out of memory, read-only): they are dropped, saying so
        (see the module)."""
        lost = [record for chunk in chunks for record in chunk]
        self.dropped += len(lost)
        log.error(
            "Redis refused delivery records: they are lost, the entries are acked anyway",
            error=str(exc),
            records=len(lost),
            event_ids=[record[1] for record in lost[:5]],
            outbox=self._key,
        )

    def put_back(self, chunks: list[Chunk]) -> None:
        """``chunks`` may not have been written (Redis unreachable): they wait again, in
        order, before any kept since."""
        self._waiting[:0] = [record for chunk in chunks for record in chunk]

    async def flush(self) -> None:
        """Write what waits, an XADD per chunk. Redis unreachable: keep what was not
        written, in order, for the next flush, and raise; Redis refusing it: drop it, saying
        so (see the module)."""
        chunks = self.take()
        done = 0
        try:
            while done < len(chunks):
                await self._redis.xadd(self._key, self._fields(chunks[done]))
                self.written(chunks[done])
                done += 1
        except ResponseError as exc:
            self.refused(chunks[done:], exc)
        except BaseException:
            self.put_back(chunks[done:])
            raise

    def _fields(self, chunk: Chunk) -> dict[Any, Any]:
        return {DELIVERIES_MARK: "1", "consumer": self._consumer, "records": orjson.dumps(chunk)}

    def __repr__(self) -> str:
        return f"<DeliveryRecords {self._key} waiting={len(self._waiting)} sent={self.sent}>"
