"""Which stream an event type goes to: the longest matching dotted prefix in a table, and,
for a partitioned route, which of its partitions (see :mod:`bus.partitions`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bus.partitions import partition_name, partition_of
from bus.patterns import Pattern

if TYPE_CHECKING:
    from bus.plain_settings import AnyBusSettings

#: The seed's streams: bot, user, system and error events; anything else goes to ``bot``.
DEFAULT_ROUTES: dict[str, str] = {
    "bot": "bot",
    "user": "user",
    "system": "system",
    "error": "errors",
    "bot.lifecycle.error": "errors",
}
DEFAULT_STREAM = "bot"


class Router:
    """Routes event types to stream names by type prefix; ``partitions`` (stream name →
    N > 1) splits a stream into N partition streams."""

    __slots__ = ("_cache", "default", "partitions", "routes")

    def __init__(
        self, routes: Mapping[str, str], default: str, partitions: Mapping[str, int] | None = None
    ) -> None:
        self.routes = dict(routes)
        self.default = default
        self.partitions = {s: n for s, n in (partitions or {}).items() if n > 1}
        self._cache: dict[str, str] = {}

    def route(self, type_: str) -> str:
        """Stream name of an event type."""
        stream = self._cache.get(type_)
        if stream is None:
            parts = type_.split(".")
            for n in range(len(parts), 0, -1):
                stream = self.routes.get(".".join(parts[:n]))
                if stream is not None:
                    break
            else:
                stream = self.default
            self._cache[type_] = stream
        return stream

    def target(self, type_: str, key: str | None) -> str:
        """The stream an event of ``type_`` with ``key`` is written to: its route's, or on a
        partitioned route the key's partition (unkeyed: spread by the millisecond)."""
        stream = self.route(type_)
        count = self.partitions.get(stream)
        if count is None:
            return stream
        index = partition_of(key, count) if key else time.time_ns() // 1_000_000 % count
        return partition_name(stream, index)

    def expand(self, stream: str) -> list[str]:
        """The streams a routed name stands for: itself, or its partitions."""
        count = self.partitions.get(stream)
        return [stream] if count is None else [partition_name(stream, i) for i in range(count)]

    def streams(self) -> set[str]:
        """Every stream the table names, the default included (partitions expanded)."""
        return {s for name in {*self.routes.values(), self.default} for s in self.expand(name)}

    def streams_for(self, pattern: Pattern) -> set[str]:
        """Every stream an event matching ``pattern`` can be routed to."""
        prefix = pattern.literal_prefix
        if not prefix:
            return self.streams()
        if len(prefix) == len(pattern.text.split(".")):  # exact type
            return set(self.expand(self.route(pattern.text)))
        out = {self.route(".".join(prefix))}
        joined = ".".join(prefix)
        for route_prefix, stream in self.routes.items():
            if route_prefix.startswith(joined + "."):
                out.add(stream)
        return {s for name in out for s in self.expand(name)}

    @classmethod
    def of(cls, settings: AnyBusSettings) -> Router:
        """The router of bus settings (routes, default stream, partitions)."""
        return cls(settings.routes, settings.default_stream, settings.partitions)
