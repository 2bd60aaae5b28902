"""The manager's data directory is its own: directories 0700, files 0600, owned by it.

It holds every secret the manager keeps (the Redis password, the PostgreSQL password, the
API's admin token, the embedded servers' configs and data). At start the manager sets its
umask to 077, which the embedded redis-server and PostgreSQL inherit, so whatever it
creates from then on is private; :func:`secure_data_dir` tightens what an earlier version or
an operator left wider (one warning names it all) and refuses files of other users, who
could change the secrets and configs the manager trusts (as PostgreSQL refuses a data
directory of the wrong owner).

One exception: when the embedded PostgreSQL runs as its own OS user (the manager is root),
the data directory itself is 0711, so that user can pass through it to its cluster; nothing
in it can be listed, and every file in it stays 0600.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog

from manager.errors import ManagerError

log = structlog.get_logger("manager")

#: The manager's umask from its start on: what it and its children create is theirs only.
PRIVATE_UMASK = 0o077
#: Paths of other owners listed in the refusal before "and N more".
_LISTED = 5


class DataDirError(ManagerError):
    """The data directory holds files the manager does not own; the message lists them."""


def secure_data_dir(
    data_dir: Path, *, traversable: bool = False, others: Mapping[Path, int] | None = None
) -> None:
    """Create ``data_dir`` if needed; tighten every entry to its owner only; refuse foreign ones.

    ``traversable``: the directory itself is 0711 (another OS user of ours must pass
    through). ``others``: subtrees (path → uid) that another user of ours owns, the embedded
    PostgreSQL's: entries of that uid there are left as they are.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    uid = os.geteuid()
    tightened: list[str] = []
    foreign: list[str] = []
    for path, info in _entries(data_dir):
        if info.st_uid != uid:
            owner = _owner(path, others or {})
            if owner != info.st_uid:
                foreign.append(f"{path} (uid {info.st_uid})")
            continue
        mode = stat.S_IMODE(info.st_mode)
        wanted = mode & 0o700
        if path == data_dir:
            wanted = 0o711 if traversable else 0o700
        if mode != wanted:
            os.chmod(path, wanted)
            if mode & ~wanted:
                tightened.append(f"{path} ({mode:o} → {wanted:o})")
    if foreign:
        more = f" and {len(foreign) - _LISTED} more" if len(foreign) > _LISTED else ""
        raise DataDirError(
            f"data_dir {data_dir} holds files the manager's user (uid {uid}) does not own: "
            f"{', '.join(foreign[:_LISTED])}{more}. Their owners could change the secrets and "
            f"configs the manager trusts: give them to it (`chown -R {uid} {data_dir}`) or "
            "remove them, and start again"
        )
    if tightened:
        log.warning(
            "data files were readable by others: now the manager's only",
            data_dir=str(data_dir),
            tightened=tightened,
        )


def _entries(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """``top`` and everything under it, with its lstat; symlinks are neither followed nor
    returned (chmod would act on their targets)."""
    yield top, top.lstat()
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            path = Path(root, name)
            try:
                info = path.lstat()
            except FileNotFoundError:  # gone meanwhile
                continue
            if not stat.S_ISLNK(info.st_mode):
                yield path, info


def _owner(path: Path, others: Mapping[Path, int]) -> int | None:
    """The uid allowed to own ``path`` besides the manager's: that of the ``others``
    subtree it is in, if any."""
    for subtree, uid in others.items():
        if path == subtree or subtree in path.parents:
            return uid
    return None
