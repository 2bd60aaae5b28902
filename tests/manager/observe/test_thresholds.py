"""Tests for manager.observe.thresholds: hysteresis reports each crossing once."""

from __future__ import annotations

import pytest

from manager.observe.thresholds import Crossing, Threshold, ThresholdWatch


def feed(watch: ThresholdWatch[str], key: str, values: list[float]) -> list[Crossing[str]]:
    """The crossings ``values`` make, in order (the Nones left out)."""
    return [c for v in values if (c := watch.update(key, v)) is not None]


class TestThreshold:
    def test_low_above_high_is_rejected(self) -> None:
        """A band whose clear line is above its raise line is a configuration error."""
        with pytest.raises(ValueError, match=r"low \(0\.9\) must not be above high \(0\.8\)"):
            Threshold(high=0.8, low=0.9)

    def test_nan_is_rejected(self) -> None:
        """A line that is not a number is rejected."""
        with pytest.raises(ValueError, match="must be numbers"):
            Threshold(high=float("nan"), low=0.0)

    def test_equal_lines_are_allowed(self) -> None:
        """low == high is a valid (band-less) threshold."""
        assert Threshold(high=5, low=5) == Threshold(5, 5)


class TestThresholdWatch:
    def test_raises_once_per_excursion(self) -> None:
        """Many samples above high give one raised crossing, not one per sample."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=90, low=80))
        assert feed(watch, "total", [10, 95, 99, 100, 91]) == [Crossing("total", 95, raised=True)]
        assert watch.active == {"total"}

    def test_clears_once_at_low(self) -> None:
        """After raising, values between the lines stay raised; reaching low clears once."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=90, low=80))
        assert feed(watch, "k", [95, 85, 81, 80, 50, 10]) == [
            Crossing("k", 95, raised=True),
            Crossing("k", 80, raised=False),
        ]
        assert watch.active == frozenset()

    def test_hovering_around_high_does_not_flap(self) -> None:
        """A value oscillating around high (but above low) is one crossing."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=90, low=80))
        assert len(feed(watch, "k", [89, 91, 89, 91, 89, 91])) == 1

    def test_each_new_excursion_is_reported(self) -> None:
        """Raise, clear, raise again: three crossings."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=10, low=5))
        assert [c.raised for c in feed(watch, "k", [10, 4, 12, 3])] == [True, False, True, False]

    def test_value_below_high_never_raises(self) -> None:
        """A key that never reaches high never reports anything, even at low."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=10, low=5))
        assert feed(watch, "k", [0, 5, 9.99, 1]) == []

    def test_keys_are_independent(self) -> None:
        """One key's crossing does not affect another's."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=10, low=5))
        assert watch.update("a", 11) == Crossing("a", 11, raised=True)
        assert watch.update("b", 7) is None
        assert watch.update("b", 10) == Crossing("b", 10, raised=True)
        assert watch.update("a", 1) == Crossing("a", 1, raised=False)
        assert watch.active == {"b"}

    def test_per_key_thresholds_override_default(self) -> None:
        """A key named in ``thresholds`` uses its own lines."""
        watch: ThresholdWatch[str] = ThresholdWatch(
            Threshold(high=10, low=5), {"big": Threshold(high=100, low=50)}
        )
        assert watch.threshold("big") == Threshold(100, 50)
        assert watch.update("big", 20) is None
        assert watch.update("small", 20) == Crossing("small", 20, raised=True)

    def test_equal_lines_do_not_flap_on_the_line(self) -> None:
        """With low == high a value resting on the line stays raised; below it clears."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=5, low=5))
        assert [c.raised for c in feed(watch, "k", [5, 5, 5, 4.9, 4.9, 5])] == [True, False, True]

    def test_forget_drops_state_silently(self) -> None:
        """A forgotten key reports no clearing and is raised anew by its next high value."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=10, low=5))
        watch.update("k", 20)
        watch.forget("k")
        watch.forget("never-seen")
        assert watch.active == frozenset()
        assert watch.update("k", 20) == Crossing("k", 20, raised=True)

    def test_nan_never_crosses(self) -> None:
        """A NaN sample (a broken reading) changes nothing."""
        watch: ThresholdWatch[str] = ThresholdWatch(Threshold(high=10, low=5))
        assert watch.update("k", float("nan")) is None
        watch.update("k", 11)
        assert watch.update("k", float("nan")) is None
        assert watch.active == {"k"}

    def test_any_hashable_key(self) -> None:
        """Keys may be tuples, e.g. (stream, group)."""
        watch: ThresholdWatch[tuple[str, str]] = ThresholdWatch(Threshold(high=1, low=0))
        assert watch.update(("s", "g"), 3) == Crossing(("s", "g"), 3, raised=True)
        assert "active=" in repr(watch)
