"""Entry point of the benchmark's child processes (workers and the idle-client probe).

The runner starts each child as a fresh interpreter (``python -c`` :data:`ENTRY` ``FD
[PROGRESS_FD]``) rather than through ``multiprocessing``: a spawned child would re-import
the parent's ``__main__`` (the whole CLI), which inflates the RSS being measured. ``FD``
is the child's end of a socket pair wrapped as a ``multiprocessing`` connection; its first
message is the job, a :class:`~manager.bench.options.WorkerSpec` or an
:class:`~manager.bench.options.IdleSpec`. ``PROGRESS_FD`` is a file the parent and the
workers map, one int64 slot per worker.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from multiprocessing.connection import Connection

import structlog
import uvloop

from manager.bench.options import IdleSpec, WorkerSpec
from manager.bench.workers import run_worker
from manager.logs import configure_cli_logging

log = structlog.get_logger("manager.bench")

#: The ``python -c`` program of a child process.
ENTRY = "from manager.bench.child import main; main()"


def main() -> None:
    """Run the job the parent sends first, reporting failure as an ``error`` message."""
    configure_cli_logging()  # a worker's stdout is not for logs
    conn = Connection(int(sys.argv[1]))
    kind, job = conn.recv()
    if kind != "job" or not isinstance(job, IdleSpec | WorkerSpec):
        raise SystemExit(f"bench child: expected a job from the parent, got {kind!r}")
    try:
        if isinstance(job, IdleSpec):
            from manager.bench.bus_roles import idle  # noqa: PLC0415 - loads the bus

            conn.send(("result", uvloop.run(idle(job))))
        else:
            with open(int(sys.argv[2]), "r+b") as file, mmap.mmap(file.fileno(), 0) as shared:
                progress = memoryview(shared).cast("q")
                try:
                    uvloop.run(run_worker(job, conn, progress))
                finally:
                    progress.release()
    except Exception as exc:
        if _parent_gone(exc):
            raise SystemExit(1) from None  # the parent gave up on the run: nobody to tell
        log.exception("bench child failed", child=job.label)
        with contextlib.suppress(OSError):
            conn.send(("error", f"{job.label}: {type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        conn.close()


def _parent_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (every exception of a group) says the parent closed the connection."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_parent_gone(e) for e in exc.exceptions)
    return isinstance(exc, EOFError | BrokenPipeError | ConnectionResetError)
