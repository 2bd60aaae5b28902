"""The compressed body of an archive block: up to 32 events of one stream, column by column.

A block's body is a small table of where each segment starts (u8 count, u32 offsets),
then independent *segments* of up to :data:`ROWS_PER_SEGMENT` rows, so reading one event
decompresses 16 rows, not 32. Every segment is one Zstandard frame, compressed against a
dictionary trained on the deployment's own recent segments (bus.archive.dictionaries),
which is what makes 16 rows compress well.

Inside a segment (little-endian), the columns of its rows one after the other, then the
text::

    u8 rows, u8 names, names as (u32 length, UTF-8)      types and sources of the rows
    u8[rows] type, u8[rows] source                       indexes into the names
    i64[rows] created_at (µs since 1970; then deltas), i64[rows] entry ms (then deltas),
    i64[rows] entry seq, i64[rows] version
    u16[rows] correlation: 0 none, k the block's correlations[k - 1], 0xFFFF text below
    u8[rows] causation: 0 none, 1 same as the correlation, 2 sixteen bytes below, 3 text
    u8[rows] which texts are absent (bit 0 the id: it is in the block's ids; 1 the
        correlation, 2 the causation, 3 the key)
    u32[rows] lengths of the id, correlation, causation, key and data texts (0 if absent)
    then the causation UUIDs' bytes, then every text in that order, row by row

Ids that are canonical UUIDs live in the block row's ``ids`` (16 bytes a row, zeros for
the others, which are in the body), correlation ids in its ``correlations`` (PostgreSQL
indexes them); only others are in the body. Nothing
here talks to PostgreSQL: rows in, bytes out, and back.
"""

from __future__ import annotations

import functools
import itertools
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

ROWS_PER_BLOCK = 32
ROWS_PER_SEGMENT = 16
#: Compresses one raw segment, and back (bus.archive.dictionaries makes both).
Pack = Callable[[bytes], bytes]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NONE16 = 0xFFFF
_NO_ID = bytes(16)
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NO_CAUSE, _SAME_CAUSE, _UUID_CAUSE, _TEXT_CAUSE = range(4)
_U32 = struct.Struct("<I")
_INT32 = (-(2**31), 2**31 - 1)  # the version's range (PostgreSQL integer, as before)
# Record fields (bus.archive.rows.EVENT_COLUMNS order).
_ID, _TYPE, _SOURCE, _DATA, _CORR, _CAUSE, _VERSION, _KEY, _CREATED, _STREAM, _MS, _SEQ = range(12)


class BlockDataError(ValueError):
    """A row the block cannot hold (a value out of range), or a body that does not decode."""


@dataclass(frozen=True, slots=True)
class EncodedBlock:
    """What a block row stores besides its stream, positions and times."""

    ids: bytes  # 16 bytes per row: the id when a canonical UUID, else zeros (in the body)
    correlations: list[str]  # the canonical correlation ids, each once
    body: bytes  # u8 segments, u32[segments] where each starts after this header, segments


def is_canonical(text: str | None) -> bool:
    """Whether ``text`` is a UUID in its canonical form (lowercase, hyphenated): only then
    does storing it as 16 bytes (or a ``uuid``) give back the same text."""
    return text is not None and len(text) == 36 and _CANONICAL.fullmatch(text) is not None


def uuid_bytes(text: str | None) -> bytes | None:
    """The 16 bytes of a canonical UUID's text, else None."""
    return bytes.fromhex(text.replace("-", "")) if text and is_canonical(text) else None


def micros(moment: datetime) -> int:
    """Microseconds since 1970 (UTC) of an aware timestamp."""
    return (moment - _EPOCH) // _MICROSECOND


def _pack(code: str, values: Iterable[int]) -> bytes:
    packed = tuple(values)
    return struct.pack(f"<{len(packed)}{code}", *packed)


def _deltas(values: Sequence[int]) -> list[int]:
    return [values[0], *(b - a for a, b in itertools.pairwise(values))]


def _references(
    rows: Sequence[Sequence[Any]], refs: dict[str, int]
) -> tuple[list[int], bytearray, list[bytes], list[list[str | None]]]:
    """Per row: the correlation reference, the causation kind, and the causation UUIDs'
    bytes and the texts (id, correlation, causation, key, data) the body must hold."""
    corr_refs: list[int] = []
    causes = bytearray()
    cause_bytes: list[bytes] = []
    texts: list[list[str | None]] = [[], [], [], [], []]  # id, corr, cause, key, data
    for row in rows:
        corr, cause = row[_CORR], row[_CAUSE]
        corr_text = None
        if corr is None:
            corr_refs.append(0)
        elif corr in refs:
            corr_refs.append(refs[corr] + 1)
        else:
            corr_refs.append(_NONE16)
            corr_text = corr
        cause_text = None
        if cause is None:
            causes.append(_NO_CAUSE)
        elif cause == corr:
            causes.append(_SAME_CAUSE)
        elif (raw_cause := uuid_bytes(cause)) is not None:
            causes.append(_UUID_CAUSE)
            cause_bytes.append(raw_cause)
        else:
            causes.append(_TEXT_CAUSE)
            cause_text = cause
        id_text = None if is_canonical(row[_ID]) else row[_ID]
        values = (id_text, corr_text, cause_text, row[_KEY], row[_DATA])
        for column, value in zip(texts, values, strict=True):
            column.append(value)
    return corr_refs, causes, cause_bytes, texts


def _raw_segment(rows: Sequence[Sequence[Any]], refs: dict[str, int]) -> bytes:
    """The uncompressed segment of ``rows``; ``refs`` numbers the block's correlations."""
    names: dict[str, int] = {}
    for row in rows:
        names.setdefault(row[_TYPE], len(names))
        names.setdefault(row[_SOURCE], len(names))
    parts = [bytes((len(rows), len(names)))]
    for name in names:
        encoded = name.encode()
        parts += [_pack("I", [len(encoded)]), encoded]
    parts.append(bytes(names[row[_TYPE]] for row in rows))
    parts.append(bytes(names[row[_SOURCE]] for row in rows))
    versions = [row[_VERSION] for row in rows]
    if not all(_INT32[0] <= v <= _INT32[1] for v in versions):
        raise BlockDataError(f"version out of range (integer): {versions}")
    parts.append(_pack("q", _deltas([micros(row[_CREATED]) for row in rows])))
    parts.append(_pack("q", _deltas([row[_MS] for row in rows])))
    parts.append(_pack("q", [row[_SEQ] for row in rows]))
    parts.append(_pack("q", versions))
    corr_refs, causes, cause_bytes, texts = _references(rows, refs)
    parts.append(_pack("H", corr_refs))
    parts.append(bytes(causes))
    blobs = [[None if t is None else t.encode() for t in column] for column in texts]
    absent = [
        sum(1 << k for k, column in enumerate(texts) if column[i] is None) for i in range(len(rows))
    ]
    parts.append(bytes(absent))
    for column in blobs:
        parts.append(_pack("I", (0 if t is None else len(t) for t in column)))
    parts += cause_bytes
    for column in blobs:
        parts += (t for t in column if t)
    return b"".join(parts)


def correlations_of(rows: Sequence[Sequence[Any]]) -> list[str]:
    """The distinct canonical correlation ids of ``rows``, in order of first use."""
    found: dict[str, None] = {}
    for row in rows:
        if is_canonical(value := row[_CORR]):
            found.setdefault(value)
    return list(found)


def encode_block(rows: Sequence[Sequence[Any]], compress: Pack) -> EncodedBlock:
    """The block of 1 to :data:`ROWS_PER_BLOCK` event rows (``EVENT_COLUMNS`` order, one
    stream, entry order). :class:`BlockDataError` for a value it cannot hold."""
    if not 1 <= len(rows) <= ROWS_PER_BLOCK:
        raise ValueError(f"a block holds 1 to {ROWS_PER_BLOCK} rows, not {len(rows)}")
    correlations = correlations_of(rows)
    refs = {value: n for n, value in enumerate(correlations)}
    offs, segments, at = [], [], 0
    for start in range(0, len(rows), ROWS_PER_SEGMENT):
        segment = compress(_raw_segment(rows[start : start + ROWS_PER_SEGMENT], refs))
        offs.append(at)
        segments.append(segment)
        at += len(segment)
    ids = b"".join(_NO_ID if (value := uuid_bytes(row[_ID])) is None else value for row in rows)
    header = bytes((len(offs),)) + _pack("I", offs)
    return EncodedBlock(ids=ids, correlations=correlations, body=header + b"".join(segments))


def raw_segments(rows: Sequence[Sequence[Any]]) -> list[bytes]:
    """The uncompressed segments of sample rows: what a dictionary is trained on."""
    segments = [rows[i : i + ROWS_PER_SEGMENT] for i in range(0, len(rows), ROWS_PER_SEGMENT)]
    return [
        _raw_segment(part, {value: n for n, value in enumerate(correlations_of(part))})
        for part in segments
    ]


@functools.cache
def _columns(count: int) -> struct.Struct:
    """The fixed-width columns of a segment of ``count`` rows, as one layout: types,
    sources, created_at, entry ms, entry seq, version, correlation refs, causation kinds,
    absent texts, and the five text lengths."""
    c = count
    return struct.Struct(f"<{c}B{c}B{c}q{c}q{c}q{c}q{c}H{c}B{c}B{5 * c}I")


def _hex_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _decode_segment(  # noqa: PLR0917 - one segment's parts, passed on by decode_block
    raw: bytes,
    ids: bytes,
    correlations: Sequence[uuid.UUID | str],
    wanted: Iterable[int] | None,
    correlation: int | None,
    stream: str | None,
) -> dict[int, tuple[Any, ...]]:
    """The rows at ``wanted`` (positions in the segment; None: all), or with correlation
    reference ``correlation``: every column in one unpack, texts only of those rows."""
    if len(raw) < 2:
        raise BlockDataError("segment too short")
    c, n_names = raw[0], raw[1]
    at = 2
    names = []
    for _ in range(n_names):
        (size,) = _U32.unpack_from(raw, at)
        names.append(raw[at + 4 : at + 4 + size].decode())
        at += 4 + size
    layout = _columns(c)
    if at + layout.size > len(raw) or len(ids) != 16 * c:
        raise BlockDataError("segment ends inside its columns")
    v = layout.unpack_from(raw, at)
    refs, causes, absent = v[6 * c : 7 * c], v[7 * c : 8 * c], v[8 * c : 9 * c]
    uuid_at = at + layout.size
    # Where each text starts (text k = column * c + row), the texts' end last.
    texts_at = uuid_at + 16 * causes.count(_UUID_CAUSE)
    starts = list(itertools.accumulate(v[9 * c :], initial=texts_at))
    if starts[-1] != len(raw):
        raise BlockDataError("segment length does not match its columns")
    if correlation is not None:
        wanted = [i for i in range(c) if refs[i] == correlation]
    elif wanted is None:
        wanted = range(c)
    stamps = list(itertools.accumulate(v[2 * c : 3 * c]))
    entry_ms = list(itertools.accumulate(v[3 * c : 4 * c]))

    def text(k: int) -> str:
        return raw[starts[k] : starts[k + 1]].decode()

    rows: dict[int, tuple[Any, ...]] = {}
    for i in wanted:
        gone, ref, kind = absent[i], refs[i], causes[i]
        corr = (
            None if ref == 0 or (ref == _NONE16 and gone & 2)
            else text(c + i) if ref == _NONE16
            else str(correlations[ref - 1])
        )  # fmt: skip
        cause: str | None
        if kind == _NO_CAUSE:
            cause = None
        elif kind == _SAME_CAUSE:
            cause = corr
        elif kind == _UUID_CAUSE:
            start = uuid_at + 16 * causes[:i].count(_UUID_CAUSE)
            cause = _hex_uuid(raw[start : start + 16])
        else:
            cause = None if gone & 4 else text(2 * c + i)
        rows[i] = (
            _hex_uuid(ids[16 * i : 16 * i + 16]) if gone & 1 else text(i),
            names[v[i]], names[v[c + i]], None if gone & 16 else text(4 * c + i), corr, cause,
            v[5 * c + i], None if gone & 8 else text(3 * c + i),
            _EPOCH + stamps[i] * _MICROSECOND, stream, entry_ms[i], v[4 * c + i],
        )  # fmt: skip
    return rows


def block_rows(ids: bytes) -> int:
    """How many rows a block's ``ids`` stand for."""
    return len(ids) // 16


def decode_block(
    ids: bytes,
    correlations: Sequence[uuid.UUID | str],
    body: bytes,
    decompress: Pack,
    *,
    positions: Iterable[int] | None = None,
    correlation: str | None = None,
    stream: str | None = None,
) -> dict[int, tuple[Any, ...]]:
    """Rows of a block by position: all, those of ``positions``, or those correlated by
    ``correlation``, in ``EVENT_COLUMNS`` order with the stream ``stream`` (the block row
    holds it). Inflates only the segments needed. :class:`BlockDataError` for a body that
    does not decode."""
    count = block_rows(ids)
    if not body or len(body) < 1 + 4 * body[0]:
        raise BlockDataError("block body too short for its segment table")
    n_segments = body[0]
    bounds = [1 + 4 * n_segments + off for off in struct.unpack_from(f"<{n_segments}I", body, 1)]
    bounds.append(len(body))
    ref = None
    if correlation is not None:
        texts = [str(value) for value in correlations]  # UUIDs as PostgreSQL gives them
        if correlation not in texts:
            return {}
        ref = texts.index(correlation) + 1
    by_segment: dict[int, list[int] | None] = {}
    if positions is None:
        by_segment = dict.fromkeys(range((count + ROWS_PER_SEGMENT - 1) // ROWS_PER_SEGMENT))
    else:
        for position in sorted(set(positions)):
            listed = by_segment.setdefault(position // ROWS_PER_SEGMENT, [])
            assert listed is not None
            listed.append(position % ROWS_PER_SEGMENT)
    out: dict[int, tuple[Any, ...]] = {}
    for segment, wanted in by_segment.items():
        if not 0 <= segment < n_segments:
            raise BlockDataError(f"no segment {segment} in a block of {n_segments}")
        first = segment * ROWS_PER_SEGMENT
        raw = decompress(body[bounds[segment] : bounds[segment + 1]])
        try:
            rows = _decode_segment(
                raw, ids[16 * first : 16 * (first + ROWS_PER_SEGMENT)], correlations, wanted, ref,
                stream,
            )  # fmt: skip
        except (IndexError, UnicodeDecodeError, ValueError, struct.error) as exc:
            raise BlockDataError(f"segment {segment} does not decode: {exc}") from None
        for n, row in rows.items():
            out[first + n] = row
    return out
