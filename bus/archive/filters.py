"""Type patterns (``*`` one segment, ``#`` zero or more) as SQL conditions on ``events.type``.

A pattern becomes an anchored PostgreSQL regular expression matching exactly the types
:class:`bus.patterns.Pattern` matches. Dots are joined to the segments so that ``#`` can
stand for no segment at all: before the first concrete segment a ``#`` is ``([^.]+\\.)*``
(segments each followed by a dot), after it ``(\\.[^.]+)*`` (each preceded by one)::

    user.message.*   ^user\\.message\\.[^.]+$
    user.#           ^user(?:\\.[^.]+)*$                 user, user.x, user.x.y
    #.error          ^(?:[^.]+\\.)*error$                error, a.error, a.b.error
    a.#.b            ^a(?:\\.[^.]+)*\\.b$                 a.b, a.x.b, a.x.y.b
    #                ^[^.]+(?:\\.[^.]+)*$                 every type

A wildcard pattern with literal leading segments also gets a range on its prefix
(``type >= 'user' AND type < 'uses'``), which the (type, created_at) index can serve because
the column is ``COLLATE "C"`` (byte order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bus.patterns import Pattern

_ANY_TYPE = r"^[^.]+(?:\.[^.]+)*$"


def type_regex(pattern: str) -> str:
    """A PostgreSQL ARE matching the types ``Pattern(pattern)`` matches; checks the pattern."""
    Pattern(pattern)  # raises SubscriptionError naming what is wrong
    segments: list[str] = []
    for segment in pattern.split("."):
        if not (segment == "#" and segments and segments[-1] == "#"):  # "#.#" is "#"
            segments.append(segment)
    if all(s == "#" for s in segments):
        return _ANY_TYPE
    parts: list[str] = []
    started = False  # whether a concrete segment (literal or *) is already placed
    for segment in segments:
        if segment == "#":
            parts.append(r"(?:\.[^.]+)*" if started else r"(?:[^.]+\.)*")
            continue
        # Literal segments are [a-z0-9_]+ (Pattern checked): nothing to escape.
        atom = "[^.]+" if segment == "*" else segment
        parts.append(r"\." + atom if started else atom)
        started = True
    return "^" + "".join(parts) + "$"


def _prefix_range(pattern: Pattern) -> tuple[str, str] | None:
    """[low, high) bounds every matching type lies in, or None without a literal prefix."""
    prefix = ".".join(pattern.literal_prefix)
    if not prefix:
        return None
    # The last character is [a-z0-9_]: its successor is still plain ASCII.
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def type_clause(patterns: Sequence[str], args: list[Any]) -> str:
    """SQL condition: column ``type`` matches one of ``patterns``; appends its parameters.

    The condition refers to ``args`` by position (``$n`` for ``args[n-1]``), so the caller
    passes the same list to the query. Exact types become ``type = ANY($n::text[])``;
    each wildcard pattern ``(type >= $a AND type < $b AND type ~ $c)`` (or ``type ~ $c``).
    """
    exact: list[str] = []
    conditions: list[str] = []
    for text in dict.fromkeys(patterns):  # drop repeats, keep order
        pattern = Pattern(text)
        regex = type_regex(text)
        if "*" not in text and "#" not in text:
            exact.append(text)
            continue
        bounds = _prefix_range(pattern)
        args.append(regex)
        match = f"type ~ ${len(args)}"
        if bounds is not None:
            args.extend(bounds)
            match = f"(type >= ${len(args) - 1} AND type < ${len(args)} AND {match})"
        conditions.append(match)
    if exact:
        args.append(exact)
        conditions.insert(0, f"type = ANY(${len(args)}::text[])")
    return "(" + " OR ".join(conditions) + ")" if conditions else "TRUE"
