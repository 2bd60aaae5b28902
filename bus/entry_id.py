"""Stream entry ids as values: parsed once, compared as numbers, formatted back.

Redis names every stream entry ``<ms>-<seq>``: two unsigned 64-bit numbers, the
millisecond it was added and a sequence within it. Ids compare as the pair
``(ms, seq)``, never as text (``"9-0" > "10-0"`` as strings).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from bus.errors import EntryIdRangeError

#: The largest value either part of an entry id can have.
MAX_PART = 2**64 - 1
_ID = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)
#: Digits of MAX_PART: a part with more (leading zeros aside) is beyond it.
_DIGITS = len(str(MAX_PART))


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
        and :class:`~bus.errors.EntryIdRangeError` (a ValueError) for a part beyond 2^64-1
        (Redis refuses such ids). Leading zeros are allowed, as Redis allows them.
        """
        match = _ID.fullmatch(text) if isinstance(text, str) else None
        if match is None or (require_seq and match[2] is None):
            raise ValueError(
                f"{text!r} is not a stream entry id: use <milliseconds>-<sequence>, "
                "like 1700000000000-0"
            )
        ms_text, seq_text = match[1], match[2] or "0"
        if len(ms_text) > _DIGITS or len(seq_text) > _DIGITS:
            # Rare, so off the common path: int() refuses 4300 digits and more.
            ms_text, seq_text = ms_text.lstrip("0") or "0", seq_text.lstrip("0") or "0"
            if len(ms_text) > _DIGITS or len(seq_text) > _DIGITS:
                raise _beyond(text)
        ms, seq = int(ms_text), int(seq_text)
        if ms > MAX_PART or seq > MAX_PART:
            raise _beyond(text)
        return cls(ms, seq)

    @staticmethod
    def ms_of(text: str) -> int:
        """The millisecond part of the id ``text``, read without checking the rest.

        For hot paths on ids Redis gave (several times faster than :meth:`parse`); ValueError
        if what comes before the dash is not an integer.
        """
        return int(text.partition("-")[0])

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


def _beyond(text: str) -> EntryIdRangeError:
    """The error for an id of the right form with a part past 2^64-1."""
    return EntryIdRangeError(f"{text!r} is beyond what a stream entry id can be (2^64-1 each part)")
