"""Circuit breaker for one subscription: pure decisions, the caller passes the clock."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.StrEnum):
    """State of a subscription's breaker."""

    #: Handling normally.
    CLOSED = "closed"
    #: K consecutive events failed: handling paused until the cool-down ends.
    OPEN = "open"
    #: Cool-down over: the next event is a trial; success closes, failure reopens.
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class CircuitBreaker:
    """Opens after ``threshold`` consecutive failed events (0 disables it)."""

    threshold: int = 5
    cooldown: float = 30.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0

    def wait_time(self, now: float) -> float:
        """Seconds to wait before handling the next event (0: go ahead)."""
        if self.state is BreakerState.OPEN:
            remaining = self.opened_at + self.cooldown - now
            if remaining > 0:
                return remaining
            self.state = BreakerState.HALF_OPEN
        return 0.0

    def record_success(self) -> bool:
        """Note a handled event; True when this closed an open breaker."""
        was_open = self.state is not BreakerState.CLOSED
        self.state, self.failures = BreakerState.CLOSED, 0
        return was_open

    def record_failure(self, now: float) -> bool:
        """Note an event that failed all its attempts; True when this opened the breaker."""
        self.failures += 1
        if self.threshold and (
            self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold
        ):
            self.state, self.opened_at = BreakerState.OPEN, now
            return True
        return False
