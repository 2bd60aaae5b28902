"""What worker processes record and send back to the parent, and the pipe they send it on.

A worker and the parent talk over one ``multiprocessing`` pipe with tuples
``(kind, payload)``: worker → parent ``ready``, ``published`` (a :class:`Tally`),
``result`` (a :class:`WorkerResult`) or ``error`` (a message); parent → worker ``go``
(the wall-clock start time) and ``stop``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import resource
import sys
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from manager.bench.options import BenchError

_VM_RE = re.compile(rb"^(VmHWM|VmRSS):\s+(\d+) kB", re.MULTILINE)


def rss_mb() -> tuple[float, float]:
    """Peak and current resident set size of this process, in MiB.

    Reads VmHWM from /proc: ``getrusage().ru_maxrss`` of a spawned child includes the
    parent's peak (Linux carries it across exec), which would report the parent's size.
    """
    try:
        text = Path("/proc/self/status").read_bytes()
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        return peak, peak
    found = {name: int(kb) / 1024 for name, kb in _VM_RE.findall(text)}
    return found.get(b"VmHWM", 0.0), found.get(b"VmRSS", 0.0)


async def receive(conn: Connection) -> tuple[str, Any]:
    """The next message on ``conn``, awaited without blocking the event loop.

    Raises EOFError when the other end closed (its process died).
    """
    loop = asyncio.get_running_loop()
    fd = conn.fileno()
    while not conn.poll():
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
            # uvloop (libuv) made the fd non-blocking; send and recv of a large result
            # need it blocking, or they fail half-way with EAGAIN.
            os.set_blocking(fd, True)
    message: tuple[str, Any] = conn.recv()
    return message


async def expect(conn: Connection, kind: str) -> Any:
    """The payload of the next message on ``conn``, which must be ``kind``."""
    got, payload = await receive(conn)
    if got != kind:
        raise BenchError(f"expected {kind!r} from the bench parent, got {got!r}")
    return payload


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # the reader may fire again before the waiter runs
        future.set_result(None)


@dataclass(slots=True)
class Tally:
    """What a worker's producers published: the parent's list of confirmed events."""

    #: Producer index → events it tried to publish (its seqs are 0 .. n-1).
    attempted: dict[int, int] = field(default_factory=dict)
    #: ``(producer, seq)`` of events whose publish raised (not confirmed).
    failed: list[tuple[int, int]] = field(default_factory=list)
    #: Confirmed events published inside the measured window.
    measured: int = 0
    first_sent: float = math.inf
    last_sent: float = 0.0
    #: Seconds each confirmed send inside the measured window took (the publish call).
    publish_latencies: array[float] = field(default_factory=lambda: array("d"))


class Recorder:
    """Records handled events of one worker process (all its consumers).

    Per producer, a byte per seq counts deliveries (dedupe without a set: compact, so it
    barely moves the RSS being measured); latencies of first deliveries published inside
    the measured window go to an ``array('d')`` for exact percentiles in the parent.
    ``progress[slot]`` (an int64 view shared with the parent) is kept at the count of
    distinct events seen, for the parent's drain.
    """

    def __init__(self, progress: memoryview, slot: int) -> None:
        self._progress = progress
        self._slot = slot
        self.seen: dict[int, bytearray] = {}
        self.latencies = array("d")
        self.unique = 0
        self.handled = 0
        self.measure_from = math.inf
        self.first_sent = math.inf
        self.last_handled = 0.0

    def record(self, producer: int, seq: int, sent: float, handled: float) -> None:
        """Count one delivery of event ``(producer, seq)`` published at ``sent``."""
        self.handled += 1
        seen = self.seen.get(producer)
        if seen is None:
            seen = self.seen[producer] = bytearray(4096)
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
        count = seen[seq]
        if count < 255:
            seen[seq] = count + 1
        if count:
            return
        self.unique += 1
        self._progress[self._slot] = self.unique
        if sent >= self.measure_from:
            self.latencies.append(handled - sent)
            self.first_sent = min(self.first_sent, sent)
            self.last_handled = max(self.last_handled, handled)

    def __repr__(self) -> str:
        return f"<Recorder slot={self._slot} unique={self.unique} handled={self.handled}>"


@dataclass(slots=True)
class WorkerResult:
    """Everything one worker process sends back at the end."""

    index: int
    label: str
    tally: Tally
    #: Producer index → delivery count per seq (0: never handled), from this process.
    seen: dict[int, bytes]
    latencies: array[float]
    handled: int
    first_sent: float
    last_handled: float
    peak_rss_mb: float

    @classmethod
    def build(cls, index: int, label: str, tally: Tally, recorder: Recorder) -> WorkerResult:
        """The result of a worker from its tally and recorder, with its peak RSS now."""
        return cls(
            index=index,
            label=label,
            tally=tally,
            seen={p: bytes(b) for p, b in recorder.seen.items()},
            latencies=recorder.latencies,
            handled=recorder.handled,
            first_sent=recorder.first_sent,
            last_handled=recorder.last_handled,
            peak_rss_mb=rss_mb()[0],
        )
