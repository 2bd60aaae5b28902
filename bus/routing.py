"""Which stream an event type goes to: the longest matching dotted prefix in a table."""

from __future__ import annotations

from collections.abc import Mapping

from bus.patterns import Pattern

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
    """Routes event types to stream names by type prefix."""

    __slots__ = ("_cache", "default", "routes")

    def __init__(self, routes: Mapping[str, str], default: str) -> None:
        self.routes = dict(routes)
        self.default = default
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

    def streams(self) -> set[str]:
        """Every stream the table names, the default included."""
        return {*self.routes.values(), self.default}

    def streams_for(self, pattern: Pattern) -> set[str]:
        """Every stream an event matching ``pattern`` can be routed to."""
        prefix = pattern.literal_prefix
        if not prefix:
            return self.streams()
        if len(prefix) == len(pattern.text.split(".")):  # exact type
            return {self.route(pattern.text)}
        out = {self.route(".".join(prefix))}
        joined = ".".join(prefix)
        for route_prefix, stream in self.routes.items():
            if route_prefix.startswith(joined + "."):
                out.add(stream)
        return out
