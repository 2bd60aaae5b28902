"""The archiver tests' process fixture (see :mod:`.archiver_procs`)."""

from tests.manager.archive.archiver_procs import archiver_procs

__all__ = ["archiver_procs"]
