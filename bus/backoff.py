"""Backoff policy: how long to wait before attempt N. Pure; the caller sleeps."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)`` capped at ``cap``.

    ``jitter`` is the fraction of the delay that is randomised (0 = none, 1 = full jitter),
    so many consumers failing together do not retry in lockstep.
    """

    base: float = 0.2
    cap: float = 10.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exp = min(self.cap, self.base * (2 ** max(0, attempt - 1)))
        return float(exp * (1 - self.jitter) + self.rng.random() * exp * self.jitter)

    def waits(self) -> Iterator[float]:
        """The delays after failed attempts 1, 2, 3, ... without end, for one run of failures.

        The attempt stops counting once the delay reached ``cap``, so a long outage cannot
        overflow the exponent.
        """
        attempt = 1
        while True:
            yield self.delay(attempt)
            if 0 < self.base * 2 ** (attempt - 1) < self.cap:
                attempt += 1


#: Waits between tries of a Redis call while Redis is away: 0.1 s doubling up to 5 s.
REDIS_RETRY = Backoff(base=0.1, cap=5.0, jitter=0.0)
