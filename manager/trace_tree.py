"""A correlation chain as a tree by causation (``events trace`` and the HTTP API)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bus import Event


def chain_tree(chain: list[Event]) -> list[dict[str, Any]]:
    """The roots of ``chain`` as ``{"event": Event, "caused": [...]}``, children in chain
    order. An event whose cause is not in the chain shows as a root."""
    ids = {e.id for e in chain}
    children: dict[str | None, list[Event]] = defaultdict(list)
    for event in chain:
        children[event.causation_id if event.causation_id in ids else None].append(event)

    def nodes(parent: str | None, seen: frozenset[str]) -> list[dict[str, Any]]:
        return [
            {"event": e, "caused": nodes(e.id, seen | {e.id})}
            for e in children.get(parent, [])
            if e.id not in seen  # an event that claims to cause itself is shown once
        ]

    return nodes(None, frozenset())


def walk(tree: list[dict[str, Any]], depth: int = 0) -> list[tuple[int, Event]]:
    """The tree as (depth, event) in depth-first order."""
    out: list[tuple[int, Event]] = []
    for node in tree:
        out.append((depth, node["event"]))
        out.extend(walk(node["caused"], depth + 1))
    return out
