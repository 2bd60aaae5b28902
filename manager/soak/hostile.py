"""Hostile stream entries: what a broken or foreign producer can ``XADD`` with ``redis-cli``.

Onto the soak stream, where the soak groups and the archiver read them: a field that is not
UTF-8, an entry missing required fields, and a 10 MB ``data`` field. Onto a scratch stream
of the namespace: an entry id near the 64-bit limit (after it, ``XADD *`` on that stream
fails). None of them is a confirmed publish; the report says what became of each (the wire
format says: dead-lettered as ``malformed`` by every group that reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

#: The highest entry id but one: ``2^64 - 2`` milliseconds.
NEAR_LIMIT_ID = f"{2**64 - 2}-0"
BIG_DATA_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HostileEntry:
    """One entry the soak wrote: what kind, where, its entry id."""

    kind: str
    stream: str
    entry_id: str


def _entries() -> list[tuple[str, dict[Any, Any]]]:
    base: dict[Any, Any] = {
        "wire": "1",
        "type": "soak.tick",
        "source": "soak-hostile",
        "key": "hostile",
    }
    return [
        ("non-utf8", {**base, "data": b'{"n": "\xff\xfe\xc3\x28"}', b"\xff\xfename": b"\x80"}),
        ("missing-fields", {"type": "soak.tick"}),
        ("big-data", {**base, "data": '{"blob": "' + "x" * BIG_DATA_BYTES + '"}'}),
    ]


async def write_hostile(redis: Redis, stream: str, scratch: str) -> list[HostileEntry]:
    """XADD the hostile entries; what was written (an XADD Redis refused is noted as such)."""
    written: list[HostileEntry] = []
    for kind, fields in _entries():
        entry_id: Any = await redis.xadd(stream, fields)
        written.append(HostileEntry(kind, stream, str(entry_id)))
    entry_id = await redis.xadd(scratch, {"data": "near the 64-bit limit"}, id=NEAR_LIMIT_ID)
    written.append(HostileEntry("near-limit-id", scratch, str(entry_id)))
    return written
