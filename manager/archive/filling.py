"""Holding a stream's last few entries back until they fill an archive block.

The archive stores up to 32 events of one stream per block (bus.archive.block_codec), and
a block costs about the same whatever it holds: a read of a few entries stored at once
makes blocks of a few events, which take several times the disk per event of full ones.
At a steady rate each read brings a few entries, so the archiver holds back, per stream,
the entries short of a whole block and stores them with the next read's, until the
oldest of them has waited ``linger`` seconds.

Held entries are read and not acked: they stay pending in Redis under the archiver's
consumer (never trimmed), so an archiver that stops or dies loses none of them: it reads
them again from its pending entries when it starts, or another archiver claims them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from manager.archive.batch import Entries


class Filling:
    """Per stream, the entries held back until a block's worth has come or they waited
    ``linger`` seconds (0: nothing is held); streams in ``exempt`` (not stored in blocks,
    like the dead letters) are never held."""

    def __init__(
        self,
        rows_per_block: int,
        linger: float,
        *,
        exempt: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rows = rows_per_block
        self._linger = linger
        self._exempt = exempt
        self._clock = clock
        self._held: dict[str, list[tuple[str, list[str]]]] = {}
        self._since: dict[str, float] = {}  # when the oldest held entry of a stream was read

    @property
    def held(self) -> int:
        """How many entries are held back."""
        return sum(len(rows) for rows in self._held.values())

    def next_due(self) -> float | None:
        """Seconds until the oldest held entries are due (0 if they are), None if none."""
        if not self._since:
            return None
        return max(0.0, min(self._since.values()) + self._linger - self._clock())

    def take(self, entries: Entries) -> Entries:
        """What to store now of the entries held and ``entries`` (just read, in order):
        per stream, every whole block's worth, and the rest too once the oldest of it has
        waited ``linger``; what is left is held for the next call."""
        now = self._clock()
        for stream, rows in entries:
            if rows:
                self._held.setdefault(stream, []).extend(rows)
                self._since.setdefault(stream, now)
        out: Entries = []
        for stream in list(self._held):
            rows = self._held[stream]
            due = now - self._since[stream] >= self._linger or stream in self._exempt
            keep = 0 if due else len(rows) % self._rows
            if len(rows) > keep:
                out.append((stream, rows[: len(rows) - keep]))
            if keep:
                self._held[stream] = rows[len(rows) - keep :]
                if len(rows) > keep:  # what is left was read after what was stored
                    self._since[stream] = now
            else:
                del self._held[stream]
                del self._since[stream]
        return out

    def __repr__(self) -> str:
        return f"<Filling held={self.held} streams={len(self._held)} linger={self._linger}>"
