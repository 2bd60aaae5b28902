"""Find PostgreSQL's binaries: the system's, or the 16.x that the ``pgserver`` wheel carries.

``find_postgres()`` returns the ``bin`` directory ``PostgresServer`` runs (``postgres`` and
``initdb``) with the version they report; PostgreSQL 13 and later will do.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from bus.binaries import (
    candidates,
    first_new_enough,
    in_package,
    is_executable,
    version_of,
)
from manager.errors import EmbeddedServiceError

MIN_VERSION = (13, 0)
_VERSION_RE = re.compile(rb"\(PostgreSQL\) (\d+)(?:\.(\d+))?")
_SYSTEM_DIRS = Path("/usr/lib/postgresql")  # Debian/Ubuntu: /usr/lib/postgresql/<major>/bin


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory holding ``postgres`` and ``initdb``, and the version they report."""

    bin_dir: Path
    version: tuple[int, int]

    @property
    def version_str(self) -> str:
        """The version as ``major.minor``."""
        return ".".join(map(str, self.version))

    @property
    def postgres(self) -> Path:
        """The server executable."""
        return self.bin_dir / "postgres"

    @property
    def initdb(self) -> Path:
        """The executable that creates a cluster."""
        return self.bin_dir / "initdb"

    def runnable(self) -> bool:
        """Whether both executables are there and executable (by us)."""
        return is_executable(self.postgres) and is_executable(self.initdb)

    def __str__(self) -> str:
        return f"PostgreSQL {self.version_str} ({self.bin_dir})"


def _probe(bin_dir: Path) -> PostgresBinaries | None:
    """Ask ``bin_dir/postgres --version``; None if initdb is missing or it does not answer."""
    binaries = PostgresBinaries(bin_dir, (0, 0))
    version = version_of(binaries.postgres, _VERSION_RE) if binaries.runnable() else None
    return None if version is None else PostgresBinaries(bin_dir, (version[0], version[1]))


def system_postgres() -> PostgresBinaries | None:
    """Return the newest system PostgreSQL (PATH, then /usr/lib/postgresql/*/bin), or None."""
    dirs = [path.parent for path in _SYSTEM_DIRS.glob("*/bin/postgres")]
    on_path = shutil.which("postgres")
    if on_path is not None:  # often a symlink into /usr/lib/postgresql/<major>/bin
        dirs.append(Path(on_path).resolve().parent)
    found = [_probe(d) for d in dict.fromkeys(d.resolve() for d in dirs)]
    return max((b for b in found if b is not None), key=lambda b: b.version, default=None)


def bundled_postgres() -> PostgresBinaries | None:
    """Return the PostgreSQL the ``pgserver`` wheel carries, or None if it is not installed.

    Locates the package without importing it (its ``__init__`` pulls in its own server code).
    """
    return in_package("pgserver", "pginstall/bin", _probe)


def choose_postgres(
    system: PostgresBinaries | None,
    bundled: PostgresBinaries | None,
    min_version: tuple[int, int] = MIN_VERSION,
) -> PostgresBinaries:
    """Pick the system binaries if new enough, else the bundled ones, else raise."""
    chosen = first_new_enough((system, bundled), min_version)
    if chosen is not None:
        return chosen
    raise EmbeddedServiceError(
        f"no PostgreSQL >= {min_version[0]} found (system: {system or 'none'}; from the "
        f"pgserver wheel: {bundled or 'not installed'}): install PostgreSQL {min_version[0]}+ "
        "(e.g. `apt install postgresql`) or `pip install pgserver`, or set "
        "MULTIBOT_POSTGRES_DSN to an existing server"
    )


def find_postgres(min_version: tuple[int, int] = MIN_VERSION) -> PostgresBinaries:
    """Return the binaries to run: the newest system ones if >= min_version, else pgserver's."""
    system, bundled = candidates(system_postgres, bundled_postgres, min_version)
    return choose_postgres(system, bundled, min_version)
