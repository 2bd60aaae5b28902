"""Finding the memory cgroup the manager may divide among its bots (cgroup v2, else v1).

:func:`detect` reads the process's cgroups and the cgroup mounts, checks the manager may
write its cgroup and has the ``memory`` controller there, and answers with a limiter of
:mod:`manager.supervision.cgroups` or :class:`~manager.supervision.cgroups.Unavailable`
with a reason an operator can act on. Under cgroup v2 it also moves the manager into its
leaf first (a cgroup holding processes cannot give its children controllers), so it runs
once at start, before any child process is spawned.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from manager.embedded.child_process import OsUser
from manager.supervision.cgroups import (
    SUPERVISOR_LEAF,
    CgroupLimiter,
    Unavailable,
    V1Limiter,
    V2Limiter,
)

log = structlog.get_logger("manager.cgroups")
_DELEGATE = "run the manager under systemd with Delegate=yes"


def detect(
    proc: Path = Path("/proc/self"), *, leaf: str = SUPERVISOR_LEAF
) -> CgroupLimiter | Unavailable:
    """A limiter on the memory cgroup this process may divide, or why there is none.

    ``proc`` is where ``cgroup`` and ``mountinfo`` are read (this process's by default).
    Under cgroup v2 this moves the calling process into the leaf ``leaf`` and enables the
    memory controller for its siblings; it undoes that if the kernel refuses. Never raises.
    """
    reasons: list[str] = []
    try:
        own, mounts = _own_cgroups(proc), _mounts(proc)
        for hierarchy, attempt in _attempts(own, mounts, leaf):
            found = attempt()
            if isinstance(found, CgroupLimiter):
                log.info(
                    "memory limits enforced by the kernel",
                    mode=str(found.mode),
                    root=str(found.root),
                )
                return found
            reasons.append(f"{hierarchy}: {found.reason}")
    except OSError as exc:
        reasons.append(f"cannot read {exc.filename} ({exc.strerror})")
    if not reasons:
        reasons.append(f"no cgroup hierarchy with the memory controller is mounted; {_DELEGATE}")
    result = Unavailable("; ".join(reasons))
    log.info("memory limits polled by the manager", reason=result.reason)
    return result


def _attempts(
    own: dict[str, str], mounts: list[_Mount], leaf: str
) -> list[tuple[str, Callable[[], CgroupLimiter | Unavailable]]]:
    """The hierarchies to try, v2 first, each with its detection (run only when needed)."""
    attempts: list[tuple[str, Callable[[], CgroupLimiter | Unavailable]]] = []
    if "" in own and any(m.fstype == "cgroup2" for m in mounts):
        attempts.append(("cgroup v2", lambda: _detect_v2(own[""], mounts, leaf)))
    if "memory" in own and any(_is_v1_memory(m) for m in mounts):
        attempts.append(("cgroup v1", lambda: _detect_v1(own["memory"], mounts)))
    return attempts


@dataclass(frozen=True, slots=True)
class _Mount:
    """One cgroup line of ``mountinfo``."""

    #: The cgroup path of the hierarchy mounted here (``/`` unless a namespace or bind).
    root: str
    point: Path
    fstype: str
    options: frozenset[str]
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options

    def directory(self, cgroup: str) -> Path | None:
        """Where cgroup path ``cgroup`` is under this mount, None if it is not below it."""
        root = self.root.rstrip("/")
        if cgroup != root and not cgroup.startswith(f"{root}/"):
            return None
        return self.point / cgroup[len(root) :].lstrip("/")


def _own_cgroups(proc: Path) -> dict[str, str]:
    """The process's cgroup per v1 controller, and under ``""`` its cgroup v2 path."""
    own: dict[str, str] = {}
    for line in (proc / "cgroup").read_text().splitlines():
        _hierarchy, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes (``\\040`` for a space) undone."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def _mounts(proc: Path) -> list[_Mount]:
    """The cgroup and cgroup2 mounts the process sees, in mount order."""
    mounts = []
    for line in (proc / "mountinfo").read_text().splitlines():
        # id parent major:minor root point options [optional fields...] - fstype source super
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 6 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            _Mount(
                root=_unescape(fields[3]),
                point=Path(_unescape(fields[4])),
                fstype=tail[0],
                options=frozenset(fields[5].split(",")),
                super_options=frozenset(tail[2].split(",")),
            )
        )
    return mounts


def _locate(cgroup: str, mounts: list[_Mount]) -> tuple[_Mount, Path] | None:
    """The first of ``mounts`` that shows ``cgroup``, and its directory there."""
    for mount in mounts:
        directory = mount.directory(cgroup)
        if directory is not None and directory.is_dir():
            return mount, directory
    return None


def _is_v1_memory(mount: _Mount) -> bool:
    return mount.fstype == "cgroup" and "memory" in mount.super_options


def _writable(path: Path) -> bool:
    """Whether this process (its effective user) may write ``path``."""
    return os.access(path, os.W_OK, effective_ids=True)


def _read_only_reason(mount: _Mount) -> str:
    return (
        f"{mount.point} is mounted read-only (systemd's ProtectControlGroups=yes does that): "
        "set ProtectControlGroups=no in the unit (or =private on systemd 257+)"
    )


def _detect_v2(cgroup: str, mounts: list[_Mount], leaf: str) -> CgroupLimiter | Unavailable:
    found = _locate(cgroup, [m for m in mounts if m.fstype == "cgroup2"])
    if found is None:
        return Unavailable(f"the manager's cgroup {cgroup} is not under a mount; {_DELEGATE}")
    mount, directory = found
    if "memory" not in (mount.point / "cgroup.controllers").read_text().split():
        if any(_is_v1_memory(m) for m in mounts):
            return Unavailable("memory is not a cgroup v2 controller here: it is mounted as v1")
        return Unavailable(f"memory is not a controller in {mount.point}; {_DELEGATE}")
    # Already in the leaf: systemd put it there (DelegateSubgroup=), or an earlier detect().
    base = directory.parent if directory.name == leaf and directory != mount.point else directory
    if not (base / "cgroup.type").exists():  # the one file the kernel leaves out of the root
        return Unavailable(f"the manager runs in the root cgroup ({base}); {_DELEGATE}")
    if mount.read_only:
        return Unavailable(_read_only_reason(mount))
    needed = (base, base / "cgroup.procs", base / "cgroup.subtree_control")
    if not all(_writable(path) for path in needed):
        return Unavailable(f"{base} is not writable by {OsUser.current()}: {_DELEGATE}")
    controllers = (base / "cgroup.controllers").read_text().split()
    if "memory" not in controllers:
        return Unavailable(
            f"the memory controller is not available in {base} (it has "
            f"{' '.join(controllers) or 'none'}): delegate it with Delegate=yes (or "
            "Delegate=memory)"
        )
    return _take_leaf(base, leaf)


def _take_leaf(base: Path, leaf: str) -> CgroupLimiter | Unavailable:
    """Move this process into ``base/leaf`` and enable memory for ``base``'s children.

    A cgroup with processes in it cannot enable a controller for its children, so the
    manager leaves ``base`` first. Undone when the kernel refuses.
    """
    leaf_dir, pid = base / leaf, os.getpid()
    created = moved = False
    try:
        if not leaf_dir.is_dir():
            leaf_dir.mkdir()
            created = True
        if str(pid) not in (leaf_dir / "cgroup.procs").read_text().split():
            (leaf_dir / "cgroup.procs").write_text(str(pid))
            moved = True
        if "memory" not in (base / "cgroup.subtree_control").read_text().split():
            (base / "cgroup.subtree_control").write_text("+memory")
    except OSError as exc:
        with contextlib.suppress(OSError):
            if moved:
                (base / "cgroup.procs").write_text(str(pid))
            if created:
                leaf_dir.rmdir()
        if exc.errno == errno.EBUSY:
            others: list[str] = []
            with contextlib.suppress(OSError):
                others = sorted(set((base / "cgroup.procs").read_text().split()) - {str(pid)})
            return Unavailable(
                f"{base} holds other processes ({', '.join(others) or 'some'}), so it cannot "
                "give its children the memory controller: the manager must start alone in its "
                f"cgroup; {_DELEGATE} (and DelegateSubgroup={leaf} on systemd 254+)"
            )
        return Unavailable(f"cannot set up {base} ({exc.strerror}); {_DELEGATE}")
    if moved:
        log.info("manager moved into its leaf cgroup", cgroup=str(leaf_dir))
    return V2Limiter(base)


def _detect_v1(cgroup: str, mounts: list[_Mount]) -> CgroupLimiter | Unavailable:
    found = _locate(cgroup, [m for m in mounts if _is_v1_memory(m)])
    if found is None:
        return Unavailable(f"the manager's memory cgroup {cgroup} is not under a mount")
    mount, directory = found
    if not (directory / "memory.limit_in_bytes").exists():
        return Unavailable(f"{directory} is not a memory cgroup (no memory.limit_in_bytes)")
    if mount.read_only:
        return Unavailable(_read_only_reason(mount))
    if not _writable(directory):
        return Unavailable(
            f"{directory} is not writable by {OsUser.current()}: on cgroup v1 only root may "
            "limit the bots' memory (systemd delegates no v1 controller to other users); run "
            "the manager as root, or on a cgroup v2 host under systemd with Delegate=yes"
        )
    return V1Limiter(directory)
