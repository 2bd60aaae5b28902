"""Pure parts of the bus: events, wire format, patterns, conditions, routing, policies."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from bus.backoff import Backoff
from bus.breaker import CircuitBreaker
from bus.conditions import Where, compile_where
from bus.errors import EventValidationError, SubscriptionError, WireFormatError
from bus.event import Event, event_time_ms, new_event_id, validate_type
from bus.patterns import Pattern
from bus.routing import DEFAULT_ROUTES, Router
from bus.wire import decode, encode


class TestEventIds:
    def test_ids_are_uuid7_and_time_ordered(self) -> None:
        """Ids are version-7 UUIDs that sort in creation order, even within one millisecond."""
        ids = [new_event_id() for _ in range(5000)]
        assert all(uuid.UUID(i).version == 7 for i in ids)
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)

    def test_id_carries_its_time(self) -> None:
        """The millisecond inside the id is the time it was made."""
        ms = event_time_ms(new_event_id())
        assert ms is not None
        assert abs(ms - datetime.now(UTC).timestamp() * 1000) < 1000


class TestValidation:
    @pytest.mark.parametrize(
        "good", ["user.message", "user.message.received", "a.b.c.d.e", "a1.b_2"]
    )
    def test_accepts_dotted_lowercase_types(self, good: str) -> None:
        """Two to five dotted lowercase segments are valid types."""
        assert validate_type(good) == good

    @pytest.mark.parametrize(
        "bad", ["user", "User.message", "a.b.c.d.e.f", "user..message", "user.message.", "1a.b", ""]
    )
    def test_refuses_bad_types_naming_the_field(self, bad: str) -> None:
        """A bad type raises an error that names the field and shows the expected form."""
        with pytest.raises(EventValidationError, match=r"^type: .*like 'user\.message\.received'"):
            validate_type(bad)


class TestWire:
    def test_round_trip_keeps_every_field(self) -> None:
        """An encoded event decodes back to the same event."""
        event = Event(
            type="user.message.received",
            data={"user_id": 7, "text": "héllo", "nested": {"a": [1, 2]}},
            source="greeter",
            correlation_id=new_event_id(),
            causation_id=new_event_id(),
            key="7",
        )
        fields = {k: v.decode() if isinstance(v, bytes) else v for k, v in encode(event).items()}
        back = decode(fields, "s", "1-0")
        assert back.with_delivery("s", "1-0") == back
        assert (back.id, back.type, back.source, back.data, back.key, back.version) == (
            event.id, event.type, event.source, event.data, event.key, event.version,
        )  # fmt: skip
        assert back.timestamp == event.timestamp
        assert (back.correlation_id, back.causation_id) == (
            event.correlation_id,
            event.causation_id,
        )

    def test_minimal_foreign_entry_decodes(self) -> None:
        """An entry with only type, source and data (redis-cli style) decodes with defaults."""
        event = decode({"type": "user.x.y", "source": "cli", "data": "{}"}, "k", "1700000000000-3")
        assert (
            event.id
            == decode({"type": "user.x.y", "source": "c", "data": "{}"}, "k", "1700000000000-3").id
        )
        assert event.timestamp == datetime.fromtimestamp(1700000000, UTC)
        assert event.version == 1 and event.key is None

    @pytest.mark.parametrize(
        ("fields", "reason"),
        [
            ({"source": "x", "data": "{}"}, "type"),
            ({"type": "Bad", "source": "x", "data": "{}"}, "type"),
            ({"type": "a.b", "data": "{}"}, "source"),
            ({"type": "a.b", "source": "x"}, "'data' is missing"),
            ({"type": "a.b", "source": "x", "data": "{nope"}, "not valid JSON"),
            ({"type": "a.b", "source": "x", "data": "[1]"}, "JSON object"),
            ({"type": "a.b", "source": "x", "data": "{}", "id": "zzz"}, "not a UUID"),
            ({"type": "a.b", "source": "x", "data": "{}", "timestamp": "yesterday"}, "RFC 3339"),
            ({"type": "a.b", "source": "x", "data": "{}", "version": "v2"}, "integer"),
            ({"type": "a.b", "source": "x", "data": "{}", "wire": "9"}, "upgrade"),
        ],
    )
    def test_malformed_entries_say_why(self, fields: dict[str, str], reason: str) -> None:
        """A malformed entry raises WireFormatError whose reason names the problem."""
        with pytest.raises(WireFormatError, match=reason):
            decode(fields, "k", "1-0")


class TestPatterns:
    @pytest.mark.parametrize(
        ("pattern", "type_", "expected"),
        [
            ("user.message.*", "user.message.received", True),
            ("user.message.*", "user.message", False),
            ("user.message.*", "user.message.a.b", False),
            ("user.#", "user", True),
            ("user.#", "user.message.received", True),
            ("user.#", "users.message", False),
            ("#.error", "bot.lifecycle.error", True),
            ("#.error", "bot.lifecycle.errors", False),
            ("#", "anything.at.all", True),
            ("*.*", "a.b", True),
            ("a.#.z", "a.z", True),
            ("a.#.z", "a.b.c.z", True),
            ("user.message.received", "user.message.received", True),
            ("user.message.received", "user.message.sent", False),
        ],
    )
    def test_star_is_one_segment_hash_is_any(
        self, pattern: str, type_: str, expected: bool
    ) -> None:
        """'*' matches exactly one segment and '#' zero or more."""
        assert Pattern(pattern).matches(type_) is expected

    @pytest.mark.parametrize("bad", ["", "User.x", "a..b", "a.b*", "a.%"])
    def test_bad_patterns_are_refused(self, bad: str) -> None:
        """A malformed pattern is refused with the rules in the message."""
        with pytest.raises(SubscriptionError, match="'#' for zero or more"):
            Pattern(bad)


class TestConditions:
    DATA: ClassVar[dict[str, object]] = {
        "user_id": 42,
        "lang": "en",
        "age": 30,
        "vip": False,
        "profile": {"city": "Paris"},
        "tags": ["a", "b"],
    }

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ({"user_id": 42}, True),
            ({"user_id": 43}, False),
            ({"lang": {"in": ["en", "ru"]}}, True),
            ({"lang": {"nin": ["en"]}}, False),
            ({"age": {"gte": 18, "lt": 65}}, True),
            ({"age": {"gt": 30}}, False),
            ({"vip": {"exists": True}}, True),
            ({"missing": {"exists": False}}, True),
            ({"missing": {"exists": True}}, False),
            ({"profile.city": "Paris"}, True),
            ({"profile.city.x": "Paris"}, False),
            ({"lang": {"gt": 3}}, False),  # incomparable types: false, not an error
            ({"vip": {"lt": 1}}, False),  # booleans are not numbers
            ({"user_id": 42, "lang": "ru"}, False),
            ({"missing": {"ne": 1}}, True),
            ({"tags": {"contains": "b"}}, True),
            ({"tags": {"contains": "z"}}, False),
            ({"lang": {"contains": "e"}}, False),  # only lists contain
        ],
    )
    def test_conditions(self, spec: dict[str, object], expected: bool) -> None:
        """Equality, membership, comparisons and existence on dotted paths."""
        assert Where(spec).matches(self.DATA) is expected

    def test_conditions_are_serialisable(self) -> None:
        """The declarative form round-trips as JSON-ready data."""
        spec = {"age": {"gte": 18}, "lang": {"in": ["en"]}}
        assert Where(Where(spec).to_json()).matches({"age": 20, "lang": "en"})

    def test_unknown_operator_is_refused(self) -> None:
        """A typo in an operator is an error, not a silent equality check."""
        with pytest.raises(SubscriptionError, match="unknown operator"):
            Where({"age": {"gte": 1, "greater": 2}})

    def test_callables_are_accepted_too(self) -> None:
        """A plain callable works as a condition (not serialisable, but allowed)."""
        predicate = compile_where(lambda data: data.get("n") == 1)
        assert predicate is not None and predicate({"n": 1})


class TestRouting:
    def test_longest_prefix_wins_and_default_catches_rest(self) -> None:
        """Types route by their longest listed prefix; unlisted ones go to the default stream."""
        router = Router(DEFAULT_ROUTES, "bot")
        assert router.route("user.message.received") == "user"
        assert router.route("bot.lifecycle.error") == "errors"
        assert router.route("bot.lifecycle.started") == "bot"
        assert router.route("profile.girl.created") == "bot"

    def test_pattern_streams_cover_every_possible_match(self) -> None:
        """A pattern reads every stream a matching type can be routed to."""
        router = Router(DEFAULT_ROUTES, "bot")
        assert router.streams_for(Pattern("user.#")) == {"user"}
        assert router.streams_for(Pattern("bot.#")) == {"bot", "errors"}
        assert router.streams_for(Pattern("#.error")) == {"bot", "user", "system", "errors"}
        assert router.streams_for(Pattern("bot.lifecycle.error")) == {"errors"}


def state_of(breaker: CircuitBreaker) -> str:
    """The breaker's state now (a call, so the type checker does not pin it)."""
    return breaker.state.value


class TestPolicies:
    def test_backoff_grows_and_caps(self) -> None:
        """Delays double per attempt up to the cap; jitter keeps them within the range."""
        backoff = Backoff(base=0.1, cap=1.0, jitter=0.0)
        assert [backoff.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
        jittered = Backoff(base=1.0, cap=8.0, jitter=0.5, rng=random.Random(1))
        delays = [jittered.delay(3) for _ in range(200)]
        assert all(2.0 <= d <= 4.0 for d in delays) and len(set(delays)) > 100

    def test_breaker_opens_after_threshold_and_recovers(self) -> None:
        """K consecutive failures open it; after the cool-down one trial decides."""
        breaker = CircuitBreaker(threshold=3, cooldown=10.0)
        assert not breaker.record_failure(0) and not breaker.record_failure(1)
        assert breaker.record_failure(2) and state_of(breaker) == "open"
        assert breaker.wait_time(5.0) == 7.0
        assert breaker.wait_time(12.0) == 0
        assert state_of(breaker) == "half_open"
        assert breaker.record_failure(12.0) and state_of(breaker) == "open"
        assert breaker.wait_time(22.5) == 0
        assert breaker.record_success() and state_of(breaker) == "closed"

    def test_breaker_success_resets_the_count(self) -> None:
        """Only consecutive failures count."""
        breaker = CircuitBreaker(threshold=2, cooldown=1.0)
        breaker.record_failure(0)
        breaker.record_success()
        assert not breaker.record_failure(1)
