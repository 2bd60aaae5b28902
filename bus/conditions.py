"""Declarative conditions on event data, serialisable as JSON.

A condition is a mapping of a dotted path into ``data`` to either a value (equality) or an
operator mapping::

    {"user_id": 42}                         # equality
    {"lang": {"in": ["en", "ru"]}}          # membership (also "nin")
    {"age": {"gte": 18, "lt": 65}}          # comparisons: gt, gte, lt, lte, ne, eq
    {"vip": {"exists": True}}               # presence of the path
    {"bot_ids": {"contains": "greeter"}}    # a list holds the value
    {"profile.city": "Paris"}               # dotted path into nested objects

All entries must hold. A comparison between values of incompatible types is false, never an
error. The same JSON form is what the coordinator stores and the API accepts.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from bus.errors import SubscriptionError

_MISSING = object()
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
OPERATORS = frozenset({*_COMPARE, "in", "nin", "exists", "contains"})


def _lookup(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = data
    for part in path:
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _check(op: str, actual: Any, expected: Any) -> bool:
    if op == "exists":
        return (actual is not _MISSING) == bool(expected)
    if actual is _MISSING:
        return op in ("ne", "nin")
    if op == "in":
        return actual in expected
    if op == "nin":
        return actual not in expected
    if op == "contains":
        return isinstance(actual, list) and expected in actual
    if isinstance(actual, bool) != isinstance(expected, bool) and op not in ("eq", "ne"):
        return False
    try:
        return _COMPARE[op](actual, expected)
    except TypeError:
        return False


class Where:
    """A compiled set of conditions; ``Where.parse`` checks the form and names what is wrong."""

    __slots__ = ("_checks", "spec")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec: dict[str, Any] = dict(spec)
        self._checks: list[tuple[tuple[str, ...], str, Any]] = []
        for path, cond in self.spec.items():
            if not isinstance(path, str) or not path or "" in path.split("."):
                raise SubscriptionError(f"condition path {path!r} must be a dotted field name")
            parts = tuple(path.split("."))
            if isinstance(cond, Mapping) and cond and all(k in OPERATORS for k in cond):
                for op, expected in cond.items():
                    if op in ("in", "nin") and not isinstance(expected, list | tuple | set):
                        raise SubscriptionError(
                            f"condition {path}.{op} needs a list of values, got {expected!r}"
                        )
                    self._checks.append((parts, op, expected))
            elif isinstance(cond, Mapping) and any(
                isinstance(k, str) and k in OPERATORS for k in cond
            ):
                bad = sorted(str(k) for k in cond if k not in OPERATORS)
                raise SubscriptionError(
                    f"condition {path}: unknown operator(s) {bad}; "
                    f"use {sorted(OPERATORS)} or a plain value for equality"
                )
            else:
                self._checks.append((parts, "eq", cond))

    def matches(self, data: Mapping[str, Any]) -> bool:
        """Whether ``data`` satisfies every condition."""
        return all(_check(op, _lookup(data, path), expected) for path, op, expected in self._checks)

    def to_json(self) -> dict[str, Any]:
        """The serialisable form this was built from."""
        return dict(self.spec)

    def __repr__(self) -> str:
        return f"<Where {self.spec!r}>"


Predicate = Callable[[Mapping[str, Any]], bool]


def compile_where(where: Mapping[str, Any] | Predicate | None) -> Predicate | None:
    """A predicate for a subscription's ``where=``: a declarative mapping or a callable."""
    if where is None:
        return None
    if isinstance(where, Mapping):
        return Where(where).matches if where else None
    if callable(where):
        return where
    raise SubscriptionError(
        f"where= must be a mapping of conditions or a callable, got {type(where).__name__}"
    )
