"""A synthetic day of archived events for ``bench-archive --query-events``: the same records
for every run of a seed, with the variety the archive's queries meet in production.

Ten streams named by category (``orders``, ``users`` …), three event types each
(``category.entity.action``), one of them rare (0.1 %) and the others Zipf-distributed;
twenty sources, most events published by their category's two bots; about 30 % of events in
correlation chains that cross streams; a key on about 20 %; payloads of 3–6 fields, ints and
words from small vocabularies, each type with fields of its own. Ids are UUIDv7 of the
event's own millisecond, made as :func:`bus.event.new_event_id` makes them; ``created_at``
is spread evenly over one UTC day and entry ids ascend with it in each stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import islice
from typing import Any

import orjson

from bus.archive.rows import EVENT_COLUMNS

#: The day the events are published on (UTC): a fixed day in the past.
DAY = date(2026, 1, 5)
#: The rare type's share of the events.
RARE_SHARE = 0.001
_DAY_MICROS = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Categories (also the streams) with their two bots and three types; within each, the rank
# of the type by how common it is over all (1 the most common, 0 the rare one).
_CATEGORIES: dict[str, tuple[tuple[str, str], tuple[tuple[str, int], ...]]] = {
    "analytics": (("tracker", "search-indexer"),
                  (("page.viewed", 1), ("search.performed", 4), ("click.recorded", 7))),
    "orders": (("checkout-bot", "order-router"),
               (("order.created", 2), ("item.added", 5), ("order.paid", 9))),
    "notifications": (("mailer", "push-sender"),
                      (("email.sent", 3), ("push.sent", 8), ("sms.failed", 25))),
    "payments": (("payment-gateway", "fraud-check"),
                 (("charge.succeeded", 6), ("charge.failed", 18), ("refund.issued", 22))),
    "inventory": (("stock-keeper", "warehouse-sync"),
                  (("stock.reserved", 10), ("stock.released", 14), ("item.restocked", 21))),
    "auth": (("auth-service", "session-reaper"),
             (("session.started", 11), ("session.ended", 13), ("token.revoked", 0))),
    "users": (("signup-bot", "profile-sync"),
              (("profile.updated", 12), ("user.registered", 19), ("user.deleted", 28))),
    "shipping": (("shipping-bot", "label-printer"),
                 (("parcel.dispatched", 15), ("parcel.delivered", 16), ("label.printed", 24))),
    "billing": (("invoicer", "plan-manager"),
                (("invoice.issued", 17), ("invoice.paid", 20), ("plan.changed", 27))),
    "support": (("helpdesk-bot", "triage-bot"),
                (("ticket.opened", 23), ("reply.posted", 26), ("ticket.closed", 29))),
}  # fmt: skip
# Payload fields holding ints, with the upper bound of their values.
_INT_FIELDS = {"customer_id": 10**7, "order_id": 10**9, "amount_cents": 10**5, "quantity": 20,
               "attempt_number": 5, "risk_score": 1000, "duration_ms": 30_000}  # fmt: skip
#: Payload fields holding words, with their vocabulary (a condition on one picks a value).
WORD_VALUES: dict[str, tuple[str, ...]] = {
    "status": ("succeeded", "failed", "pending", "retrying", "cancelled"),
    "currency": ("EUR", "USD", "GBP", "CHF"),
    "region": ("eu-west-1", "us-east-1", "ap-southeast-2", "eu-central-1"),
    "channel": ("web", "ios-app", "android-app", "public-api", "email"),
    "plan_name": ("free", "starter", "professional", "enterprise"),
    "sku": ("sku-100234", "sku-100871", "sku-204411", "sku-309912", "sku-411087"),
    "reason": ("upstream_timeout", "card_declined", "duplicate_request", "customer_request"),
    "locale": ("en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR"),
}  # fmt: skip
_ROOT_SHARE = 0.079  # of the events not continuing a chain: 6 % roots + 24 % followers
_CHAIN_GAP = 50  # events at most between two of a chain (well under a second at 10 M/day)


@dataclass(frozen=True, slots=True)
class TypeSpec:
    """An event type of the day: its stream, its bots, and its payload's fields."""

    name: str
    stream: str
    sources: tuple[str, str]
    ints: tuple[str, ...]
    words: tuple[str, ...]


def uuid7(ms: int, seq: int, rand: int) -> str:
    """A canonical UUIDv7 string: 48-bit ``ms``, 12-bit ``seq``, 62 random bits ``rand``."""
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def chunks(records: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    """``records`` in lists of ``size`` (the last one shorter)."""
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


class SyntheticDay:
    """``events`` records of :data:`DAY`, the same for the same ``seed``."""

    def __init__(self, events: int, seed: int = 20260105) -> None:
        if not 0 < events <= _DAY_MICROS:
            raise ValueError(f"events must be in 1..{_DAY_MICROS}, got {events}")
        self.events = events
        self.seed = seed
        self.start = datetime.combine(DAY, time(), UTC)
        self.end = self.start + timedelta(days=1)
        layout = random.Random(seed)  # the types' fields: fixed by the seed, not by the count
        ranked: list[tuple[int, TypeSpec]] = []
        for stream, (bots, types) in _CATEGORIES.items():
            for suffix, rank in types:
                fields = layout.sample([*_INT_FIELDS, *WORD_VALUES], layout.randint(3, 6))
                words = [f for f in fields if f in WORD_VALUES] or [layout.choice([*WORD_VALUES])]
                ints = tuple(f for f in fields if f in _INT_FIELDS)[: 6 - len(words)]
                spec = TypeSpec(f"{stream}.{suffix}", stream, bots, ints, tuple(words))
                ranked.append((rank, spec))
        ranked.sort(key=lambda pair: pair[0])
        self.rare = ranked[0][1]
        #: Every type but the rare one, the most common first.
        self.common = [spec for _, spec in ranked[1:]]
        self.types = [spec for _, spec in ranked]
        self.sources = [bot for bots, _ in _CATEGORIES.values() for bot in bots]
        self.streams = list(_CATEGORIES)
        zipf = [1 / rank for rank in range(1, len(self.common) + 1)]
        scale = (1 - RARE_SHARE) / sum(zipf)
        self._cum_weights = list(_accumulate([RARE_SHARE, *(w * scale for w in zipf)]))

    def hour(self, n: int) -> tuple[datetime, datetime]:
        """Hour ``n`` (0–23) of the day as (since, until)."""
        since = self.start + timedelta(hours=n)
        return since, since + timedelta(hours=1)

    def records(self) -> Iterator[tuple[Any, ...]]:
        """The day's records in ``created_at`` order (``EVENT_COLUMNS`` order, stream by
        name, data as compact JSON text)."""
        rng = random.Random(self.seed)
        start_us = (self.start - _EPOCH) // timedelta(microseconds=1)
        due: dict[int, list[list[Any]]] = {}  # event index: chains [root, last id, left]
        entries: dict[str, tuple[int, int]] = {}  # stream: its last (ms, seq)
        last_ms, id_seq = -1, 0
        for n in range(self.events):
            offset = n * _DAY_MICROS // self.events
            ms = (start_us + offset) // 1000
            if ms > last_ms:  # as new_event_id: a random start, then counting in the ms
                last_ms, id_seq = ms, rng.getrandbits(10)
            else:
                id_seq += 1
            event_id = uuid7(ms, id_seq, rng.getrandbits(62))
            spec = rng.choices(self.types, cum_weights=self._cum_weights)[0]
            correlation = causation = None
            if chains := due.pop(n, None):
                chain = chains.pop()
                if chains:  # two chains due at once: the other takes the next event
                    due.setdefault(n + 1, []).extend(chains)
                correlation, causation = chain[0], chain[1]
                chain[1], chain[2] = event_id, chain[2] - 1
                if chain[2]:
                    due.setdefault(n + rng.randint(1, _CHAIN_GAP), []).append(chain)
            elif rng.random() < _ROOT_SHARE:
                chain = [event_id, event_id, rng.randint(1, 7)]
                due.setdefault(n + rng.randint(1, _CHAIN_GAP), []).append(chain)
            if rng.random() < 0.85:
                source = spec.sources[rng.getrandbits(1)]
            else:
                source = rng.choice(self.sources)
            key = f"{spec.stream}-{rng.randrange(5000)}" if rng.random() < 0.2 else None
            data: dict[str, int | str] = {n: rng.randrange(_INT_FIELDS[n]) for n in spec.ints}
            for name in spec.words:
                data[name] = rng.choice(WORD_VALUES[name])
            entry_ms, entry_seq = entries.get(spec.stream, (-1, -1))
            entry_seq = entry_seq + 1 if entry_ms == ms else 0
            entries[spec.stream] = (ms, entry_seq)
            yield (
                event_id, spec.name, source, orjson.dumps(data).decode(), correlation,
                causation, 1, key, self.start + timedelta(microseconds=offset), spec.stream,
                ms, entry_seq,
            )  # fmt: skip

    def __repr__(self) -> str:
        return f"<SyntheticDay {DAY} events={self.events} seed={self.seed}>"


def _accumulate(values: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


_ID, _CORRELATION, _STREAM, _ENTRY_MS, _ENTRY_SEQ = map(
    EVENT_COLUMNS.index, ("id", "correlation_id", "stream", "entry_ms", "entry_seq")
)


@dataclass
class Sample:
    """Event ids, chain roots and stream positions seen among the records, for the queries'
    parameters: every ``stride``-th record's (at most ~1,000 of each for any count)."""

    stride: int
    ids: list[str] = field(default_factory=list)
    roots: dict[str, None] = field(default_factory=dict)
    positions: list[tuple[str, str]] = field(default_factory=list)  # (stream, entry id)
    _seen: int = 0

    @classmethod
    def of_size(cls, events: int, size: int = 1000) -> Sample:
        """A sample keeping about ``size`` of ``events`` records."""
        return cls(stride=max(1, events // size))

    def add(self, records: Iterable[Sequence[Any]]) -> None:
        """Look at the next records (in the order they were made)."""
        for record in records:
            if self._seen % self.stride == 0:
                self.ids.append(record[_ID])
                if record[_CORRELATION] is not None:
                    self.roots[record[_CORRELATION]] = None
                entry = f"{record[_ENTRY_MS]}-{record[_ENTRY_SEQ]}"
                self.positions.append((record[_STREAM], entry))
            self._seen += 1
