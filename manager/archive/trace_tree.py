"""A correlation chain as a tree by causation (``events trace`` and the HTTP API).

The tree is given flat, in depth-first order, each event with its parent's id and its
depth: a chain can be any number of hops deep (a bot answering itself in a loop), and a
flat list is walked without recursion and rendered as JSON without nesting, which has a
limit (orjson refuses more than 254 levels).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from bus import Event


@dataclass(frozen=True, slots=True)
class ChainNode:
    """One event of a chain, placed in the tree by causation."""

    event: Event
    #: The event it hangs under: its cause, or None for a root.
    parent_id: str | None
    #: Hops from its root (0 for a root).
    depth: int


def chain_tree(chain: Sequence[Event]) -> list[ChainNode]:
    """Every event of ``chain`` once, depth-first: each root, then what it caused, children
    in chain order. An event whose cause is not in the chain (or is itself) is a root; so
    is the first event of a causation loop that no root leads to."""
    ids = {e.id for e in chain}
    children: dict[str, list[Event]] = defaultdict(list)
    roots: list[Event] = []
    for event in chain:
        cause = event.causation_id
        if cause is not None and cause in ids and cause != event.id:
            children[cause].append(event)
        else:
            roots.append(event)
    out: list[ChainNode] = []
    placed: set[str] = set()
    for start in [*roots, *chain]:  # the chain again: events only a loop leads to
        stack: list[tuple[Event, str | None, int]] = [(start, None, 0)]
        while stack:
            event, parent_id, depth = stack.pop()
            if event.id in placed:  # a loop, or an id stored twice
                continue
            placed.add(event.id)
            out.append(ChainNode(event, parent_id, depth))
            stack.extend((c, event.id, depth + 1) for c in reversed(children.get(event.id, [])))
    return out
