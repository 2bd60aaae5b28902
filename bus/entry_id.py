"""Stream entry ids as values: parsed once, compared as numbers, formatted back.

Redis names every stream entry ``<ms>-<seq>``: two unsigned 64-bit numbers, the
millisecond it was added and a sequence within it. Ids compare as the pair
``(ms, seq)``, never as text (``"9-0" > "10-0"`` as strings).
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: The largest value either part of an entry id can have.
MAX_PART = 2**64 - 1
_ID = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)


class EntryId(NamedTuple):
    """A stream entry id ``(ms, seq)``, ordered as Redis orders entries.

    A named tuple rather than a dataclass: it is equal to (and sorts with) the plain
    ``(ms, seq)`` pairs the archive's rows and older callers hand around.
    """

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str, *, require_seq: bool = False) -> EntryId:
        """The id written as ``"<ms>-<seq>"``, or ``"<ms>"`` alone for ``<ms>-0``.

        ``require_seq`` refuses the ``"<ms>"`` form. Raises ValueError for anything else,
        and for a part beyond 2^64-1 (Redis refuses such ids).
        """
        match = _ID.fullmatch(text) if isinstance(text, str) else None
        if match is None or (require_seq and match[2] is None):
            raise ValueError(
                f"{text!r} is not a stream entry id: use <milliseconds>-<sequence>, "
                "like 1700000000000-0"
            )
        ms, seq = int(match[1]), int(match[2] or 0)
        if ms > MAX_PART or seq > MAX_PART:
            raise ValueError(f"{text!r} is beyond what a stream entry id can be (2^64-1 each part)")
        return cls(ms, seq)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    def next(self) -> EntryId:
        """The smallest id after this one; ValueError after the largest id there is."""
        if self.seq < MAX_PART:
            return EntryId(self.ms, self.seq + 1)
        if self.ms < MAX_PART:
            return EntryId(self.ms + 1, 0)
        raise ValueError(f"no stream entry id comes after {self}")

    def previous(self) -> EntryId:
        """The largest id before this one (``0-0`` stays ``0-0``: nothing is below it)."""
        if self.seq > 0:
            return EntryId(self.ms, self.seq - 1)
        return EntryId(self.ms - 1, MAX_PART) if self.ms > 0 else EntryId(0, 0)
