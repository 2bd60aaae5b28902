"""Hysteresis for watched numbers: report each crossing once, not every sample above a line.

A value that hovers around one line would raise and clear an alert on every sample; two
lines (raise at ``high``, clear at ``low``) make one alert per real excursion. The watch is
a pure policy object: the caller samples the values, feeds them in and acts on what comes
back; nothing here reads a clock or talks to Redis.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Threshold:
    """Raise at ``value >= high``, clear again only at ``value <= low`` (``low <= high``).

    With ``low == high`` there is no band; a value sitting exactly on the line stays raised
    (clearing needs a value below it), so it still cannot flap.
    """

    high: float
    low: float

    def __post_init__(self) -> None:
        if math.isnan(self.high) or math.isnan(self.low):
            raise ValueError(
                f"threshold lines must be numbers, got high={self.high} low={self.low}"
            )
        if self.low > self.high:
            raise ValueError(
                f"threshold low ({self.low}) must not be above high ({self.high}): "
                "an alert raises at high and clears at low"
            )


@dataclass(frozen=True, slots=True)
class Crossing(Generic[K]):
    """A watched value crossed a line: ``raised`` at high, or cleared (``raised=False``) at low."""

    key: K
    value: float
    raised: bool


class ThresholdWatch(Generic[K]):
    """Tracks, per key, whether its value is above its threshold; reports only the changes.

    Every key uses ``default`` unless ``thresholds`` names its own. A key starts cleared, so
    its first value at or above high is a crossing.
    """

    def __init__(self, default: Threshold, thresholds: Mapping[K, Threshold] | None = None) -> None:
        self._default = default
        self._thresholds: dict[K, Threshold] = dict(thresholds or {})
        self._active: set[K] = set()

    def threshold(self, key: K) -> Threshold:
        """The lines that apply to ``key``."""
        return self._thresholds.get(key, self._default)

    def update(self, key: K, value: float) -> Crossing[K] | None:
        """Record the latest value of ``key``; the crossing it makes, if any, else None.

        Returns ``Crossing(raised=True)`` once when the value reaches high, and
        ``Crossing(raised=False)`` once when it later falls to low (and below high); values in
        between, or further on the same side, return None. NaN never crosses anything.
        """
        line = self.threshold(key)
        if key in self._active:
            if value <= line.low and value < line.high:
                self._active.discard(key)
                return Crossing(key, value, raised=False)
        elif value >= line.high:
            self._active.add(key)
            return Crossing(key, value, raised=True)
        return None

    @property
    def active(self) -> frozenset[K]:
        """Keys currently raised (crossed high and not yet back down to low)."""
        return frozenset(self._active)

    def forget(self, key: K) -> None:
        """Drop what is known about ``key`` (e.g. a bot that was removed); no crossing results.

        Its next value is judged as if it were new.
        """
        self._active.discard(key)

    def __repr__(self) -> str:
        return (
            f"<ThresholdWatch high={self._default.high} low={self._default.low} "
            f"overrides={len(self._thresholds)} active={sorted(map(repr, self._active))}>"
        )
