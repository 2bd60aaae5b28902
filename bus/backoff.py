"""Backoff policy: how long to wait before attempt N. Pure; the caller sleeps."""

from __future__ import annotations

import random
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
