"""Zstandard dictionaries the archive's blocks are compressed with (``event_dictionaries``).

Sixteen events compress poorly on their own: most of what they share (field names, types,
sources, common values) is said once per segment. A dictionary trained on the deployment's
own recent segments says it once for all of them, and halves the bytes of a segment.

A writer trains one from the first few thousand events it archives (until then blocks are
compressed without one), stores it, and trains a new one each day, so a dictionary follows
what the fleet publishes. A block names its dictionary; dictionaries are never changed
and are kept (32 KiB a day), so every block stays readable. Several archivers share the
newest one stored; two training at once each store their own, which is harmless. A writer
that has none of its own yet (a restarted archiver) takes the newest stored, however old,
until it trains one: on the bench's synthetic day, one trained on its first events still
made the segments at its end 19 % smaller than none.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
import zstandard

from bus.archive.block_codec import BlockDataError, Pack, raw_segments
from bus.archive.errors import ArchiveDataError

log = structlog.get_logger("bus.archive")

#: Bytes of a trained dictionary.
DICTIONARY_BYTES = 32 * 1024
#: Segments (of 16 events) sampled before training.
TRAIN_SEGMENTS = 256
#: Seconds a dictionary is used for new blocks before another is trained.
DICTIONARY_AGE = 86_400.0
#: The most bytes one segment may inflate to (16 events of 4 MiB): a frame claiming more
#: is damaged, and is refused before any memory is taken for it.
MAX_SEGMENT_BYTES = 64 * 1024 * 1024
_LEVEL = 3  # with a dictionary, level 3 is within 10 % of level 9's size at 1/6 the CPU

# No parameters. Returns the newest dictionary and its age in seconds, or no row.
_NEWEST = """
SELECT id, dict, extract(epoch FROM now() - created_at)::float8 AS age
FROM event_dictionaries ORDER BY id DESC LIMIT 1
"""
# $1: the dictionary (bytea). Returns its id.
_STORE = "INSERT INTO event_dictionaries (dict) VALUES ($1) RETURNING id"
# $1: ids (int[]). Returns (id, dict) of those stored.
_LOAD = "SELECT id, dict FROM event_dictionaries WHERE id = ANY($1::integer[])"


def _decompressor(dictionary: zstandard.ZstdCompressionDict | None) -> Pack:
    unpacker = (
        zstandard.ZstdDecompressor(dict_data=dictionary)
        if dictionary is not None
        else zstandard.ZstdDecompressor()
    )

    def decompress(frame: bytes) -> bytes:
        try:
            size = zstandard.frame_content_size(frame)
            if not 0 <= size <= MAX_SEGMENT_BYTES:
                raise BlockDataError(f"segment claims {size} bytes: damaged")
            return unpacker.decompress(frame)
        except zstandard.ZstdError as exc:
            raise BlockDataError(f"segment does not decompress: {exc}") from None

    return decompress


def _compressor(dictionary: zstandard.ZstdCompressionDict | None) -> Pack:
    # A checksum per segment (4 bytes): a damaged body is an error, never other events.
    packer = (
        zstandard.ZstdCompressor(level=_LEVEL, dict_data=dictionary, write_checksum=True)
        if dictionary is not None
        else zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True)
    )
    return packer.compress


#: Blocks written without a dictionary (before the first was trained).
PLAIN_COMPRESS = _compressor(None)
PLAIN_DECOMPRESS = _decompressor(None)


class Dictionaries:
    """The dictionary new blocks are compressed with, and every one blocks were read with."""

    def __init__(self) -> None:
        self._readers: dict[int | None, Pack] = {None: PLAIN_DECOMPRESS}
        self._writer: tuple[int, Pack] | None = None
        self._writer_until = 0.0  # monotonic time it stops being used for new blocks
        self._samples: list[bytes | bytearray | memoryview] = []
        self._wanted = TRAIN_SEGMENTS

    async def for_writing(
        self, conn: Any, records: Sequence[tuple[Any, ...]]
    ) -> tuple[int | None, Pack]:
        """The dictionary id (None: none yet) and compressor for a batch of ``records``:
        the newest stored if less than a day old, else one trained on recent batches (the
        newest, however old, until then)."""
        if self._writer is not None and time.monotonic() < self._writer_until:
            return self._writer
        newest = await conn.fetchrow(_NEWEST)
        if newest is not None and newest["age"] < DICTIONARY_AGE:
            return self._adopt(newest["id"], newest["dict"], newest["age"])
        if newest is not None and newest["id"] != (self._writer or (None,))[0]:
            # Old, but it beats none (and an older one of ours): used until one is trained.
            self._adopt(newest["id"], newest["dict"], newest["age"])
        # A row the archive refuses (the batch is then stored one by one): not sampled.
        with contextlib.suppress(BlockDataError):
            self._samples += raw_segments(records)[: self._wanted - len(self._samples)]
        if len(self._samples) >= self._wanted:
            samples, self._samples = self._samples, []
            try:
                trained = await asyncio.to_thread(
                    zstandard.train_dictionary, DICTIONARY_BYTES, samples
                )
            except zstandard.ZstdError as exc:  # too few distinct samples: sample more
                self._wanted = min(self._wanted * 2, 8 * TRAIN_SEGMENTS)
                log.warning("compression dictionary not trained", error=str(exc))
            else:
                data = trained.as_bytes()
                dict_id = int(await conn.fetchval(_STORE, data))
                log.info("compression dictionary trained", id=dict_id, samples=len(samples))
                return self._adopt(dict_id, data, 0.0)
        if self._writer is not None:  # an old one still beats none until the next is made
            return self._writer
        return None, PLAIN_COMPRESS

    def _adopt(self, dict_id: int, data: bytes, age: float) -> tuple[int, Pack]:
        dictionary = zstandard.ZstdCompressionDict(data)
        self._readers.setdefault(dict_id, _decompressor(dictionary))
        self._writer = (dict_id, _compressor(dictionary))
        self._writer_until = time.monotonic() + DICTIONARY_AGE - age
        return self._writer

    async def load(self, conn: Any, ids: Iterable[int | None]) -> None:
        """Have the dictionaries of these ids at hand (one query for any not yet seen)."""
        missing = {i for i in ids if i is not None and i not in self._readers}
        if not missing:
            return
        for row in await conn.fetch(_LOAD, sorted(missing)):
            dictionary = zstandard.ZstdCompressionDict(row["dict"])
            self._readers[row["id"]] = _decompressor(dictionary)
        lost = {i for i in missing if i not in self._readers}
        if lost:
            raise ArchiveDataError(
                f"compression dictionaries {sorted(lost)} are missing from event_dictionaries:"
                " the blocks made with them cannot be read (restore the table from a backup)"
            )

    def reader(self, dict_id: int | None) -> Pack:
        """The decompressor of a dictionary :meth:`load` fetched."""
        return self._readers[dict_id]
