"""Backoff waits: how long to wait after each failed try of one run of failures."""

from __future__ import annotations

import itertools

from bus.backoff import REDIS_RETRY, Backoff


class TestWaits:
    def test_redis_retry_doubles_from_a_tenth_up_to_five_seconds(self) -> None:
        """0.1 s, doubling after each failure, held at 5 s."""
        waits = list(itertools.islice(REDIS_RETRY.waits(), 9))
        assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]

    def test_waits_follow_delay(self) -> None:
        """Each wait is ``delay`` of its attempt number."""
        policy = Backoff(base=0.2, cap=30.0, jitter=0.0)
        waits = list(itertools.islice(policy.waits(), 12))
        assert waits == [policy.delay(attempt) for attempt in range(1, 13)]

    def test_a_long_outage_stays_at_the_cap(self) -> None:
        """Thousands of failures in a row still wait the cap (the exponent does not overflow)."""
        waits = REDIS_RETRY.waits()
        for _ in range(5000):
            last = next(waits)
        assert last == 5.0

    def test_a_zero_base_never_waits(self) -> None:
        """A zero base waits nothing, however long the run of failures."""
        waits = Backoff(base=0.0, cap=1.0, jitter=0.0).waits()
        assert all(next(waits) == 0.0 for _ in range(2000))
