"""Type patterns: ``*`` matches one segment, ``#`` zero or more.

``user.message.*`` matches ``user.message.received`` but not ``user.message``;
``user.#`` matches ``user``, ``user.message`` and ``user.message.received``;
``#.error`` matches every type whose last segment is ``error``.
"""

from __future__ import annotations

import re

from bus.errors import SubscriptionError

_SEGMENT_RE = re.compile(r"^(?:[a-z0-9_]+|\*|#)$")


class Pattern:
    """A compiled type pattern; ``matches`` is cached per type (there are few types)."""

    __slots__ = ("_cache", "_exact", "_regex", "literal_prefix", "text")

    def __init__(self, text: str) -> None:
        segments = text.split(".") if isinstance(text, str) else []
        if not segments or not all(_SEGMENT_RE.match(s) for s in segments):
            raise SubscriptionError(
                f"bad pattern {text!r}: use dotted lowercase segments, '*' for exactly one "
                "segment and '#' for zero or more, like 'user.message.*' or 'profile.#'"
            )
        self.text = text
        self._exact = "*" not in segments and "#" not in segments
        parts = []
        for seg in segments:
            if seg == "*":
                parts.append(r"\.[^.]+")
            elif seg == "#":
                parts.append(r"(?:\.[^.]+)*")
            else:
                parts.append(r"\." + re.escape(seg))
        self._regex = re.compile("^" + "".join(parts) + "$")
        self._cache: dict[str, bool] = {}
        #: The leading segments before the first wildcard.
        self.literal_prefix: tuple[str, ...] = tuple(
            segments[: next((i for i, s in enumerate(segments) if s in ("*", "#")), len(segments))]
        )

    @property
    def exact(self) -> bool:
        """Whether the pattern is a type itself (no wildcard)."""
        return self._exact

    @property
    def regex(self) -> str:
        """The regular expression ``"." + type`` must match (also valid in PostgreSQL)."""
        return self._regex.pattern

    def matches(self, type_: str) -> bool:
        """Whether an event type matches this pattern."""
        hit = self._cache.get(type_)
        if hit is None:
            hit = type_ == self.text if self._exact else bool(self._regex.match("." + type_))
            if len(self._cache) < 10_000:
                self._cache[type_] = hit
        return hit

    def __repr__(self) -> str:
        return f"<Pattern {self.text}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)
