"""Kernel-enforced memory limits: each bot process in a memory cgroup of its own.

:func:`manager.supervision.cgroup_detect.detect` finds a memory cgroup the manager may
divide, and answers with a :class:`CgroupLimiter` or, when there is none,
:class:`Unavailable` with the reason (then the supervisor keeps polling each bot's RSS).
The supervisor calls :meth:`CgroupLimiter.place` right after it spawned a bot process: the
process moves into its own cgroup, whose limit the kernel enforces (a process over it is
OOM-killed with SIGKILL, whatever the manager is doing). After the process exited,
:meth:`BotCgroup.oom_kills` says whether the kernel killed it, and :meth:`BotCgroup.remove`
kills what it left behind (a grandchild in a session of its own escapes a kill of the
process group, not its cgroup) and removes the directory.

Two hierarchies are understood:

- **cgroup v2**, what systemd's ``Delegate=yes`` hands a service: the manager's own cgroup
  must be writable and have the ``memory`` controller. A cgroup with processes cannot give
  controllers to children ("no internal processes"), so the manager first moves itself into
  a leaf child (``supervisor/``, or finds systemd put it there: ``DelegateSubgroup=``), then
  enables ``+memory`` for the children, so detection runs before any child is spawned.
- **cgroup v1** (legacy and hybrid hosts): a writable directory of the ``memory``
  hierarchy, as root; bots' cgroups are children of the manager's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

import structlog

from manager.errors import ManagerError
from manager.observe.memory import format_size

log = structlog.get_logger("manager.cgroups")

#: The leaf the manager moves itself into under cgroup v2 (systemd: ``DelegateSubgroup=``).
SUPERVISOR_LEAF = "supervisor"
#: A bot cgroup's name: no dots, so it never meets one of the kernel's files (``memory.max``).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class Enforcement(StrEnum):
    """Who enforces a bot's ``memory_limit``."""

    #: The kernel, through a cgroup v2 leaf per bot process (``memory.max``).
    CGROUP_V2 = "cgroup v2"
    #: The kernel, through a cgroup v1 memory cgroup per bot process (``memory.limit_in_bytes``).
    CGROUP_V1 = "cgroup v1"
    #: The manager, polling each bot's RSS every coordinator interval.
    POLLING = "polling"


class CgroupError(ManagerError):
    """A bot process could not be given its memory cgroup."""


@dataclass(frozen=True, slots=True)
class Unavailable:
    """No memory cgroup the manager can use; ``reason`` says why and what to do."""

    reason: str

    @property
    def mode(self) -> Enforcement:
        """Limits stay with the manager's polling."""
        return Enforcement.POLLING


class BotCgroup:
    """The memory cgroup of one bot process: its usage, its OOM kills, its removal."""

    def __init__(self, path: Path, limit_bytes: int, *, usage_file: str, events_file: str) -> None:
        #: The cgroup's directory.
        self.path = path
        self.limit_bytes = limit_bytes
        self._usage_file = usage_file
        self._events_file = events_file

    @property
    def name(self) -> str:
        """The cgroup's name, as given to :meth:`CgroupLimiter.place`."""
        return self.path.name

    def usage(self) -> int:
        """Bytes of memory charged to the cgroup now (what the kernel holds to the limit)."""
        return int(self._read(self._usage_file))

    def oom_kills(self) -> int:
        """How many processes of the cgroup the kernel killed for being over the limit.

        Above 0 after the bot exited by SIGKILL: the kernel killed it, not a crash. On cgroup
        v2 one OOM kills the whole cgroup (``memory.oom.group``), each process counted.
        """
        for line in self._read(self._events_file).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        """The processes in the cgroup."""
        return [int(pid) for pid in self._read("cgroup.procs").split()]

    async def remove(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - a bound, not a wait
        """Kill whatever is still in the cgroup and remove it; True once it is gone.

        Call it after the bot process exited: what is left are processes it started (they
        are SIGKILLed). The kernel lets a cgroup go only once its last process finished
        dying, so a busy directory is retried for up to ``timeout`` seconds; there is no
        event to await for that on cgroup v1. Never raises: a failure is logged as a warning.
        """
        deadline = time.monotonic() + timeout
        delay, killed = 0.01, False
        while True:
            try:
                killed = self._kill_rest(log_it=not killed) or killed
                self.path.rmdir()
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("bot cgroup not removed", cgroup=str(self.path), error=str(exc))
                    return False
            else:
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _kill_rest(self, *, log_it: bool) -> bool:
        """SIGKILL every process in the cgroup; whether there was any."""
        pids = [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        if not pids:
            return False
        if log_it:
            log.warning("killing what the bot left in its cgroup", cgroup=self.name, pids=pids)
        kill = self.path / "cgroup.kill"
        if kill.exists():  # cgroup v2, Linux 5.14+: atomic, even against a fork bomb
            kill.write_text("1")
            return True
        for pid in pids:  # a pid read here and reused before the kill: a window of microseconds
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(pid, signal.SIGKILL)
        return True

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError as exc:
            raise CgroupError(
                f"cannot read {self.path / name} ({exc.strerror}): was the cgroup removed?"
            ) from exc

    def __repr__(self) -> str:
        return f"<BotCgroup {self.name} limit={format_size(self.limit_bytes)}>"


class CgroupLimiter(ABC):
    """Puts bot processes into memory cgroups of their own, under ``root``."""

    #: Which hierarchy this limiter uses.
    mode: ClassVar[Enforcement]
    _usage_file: ClassVar[str]
    _events_file: ClassVar[str]

    def __init__(self, root: Path) -> None:
        #: The directory the bots' cgroups are made in.
        self.root = root

    def place(self, pid: int, name: str, limit_bytes: int) -> BotCgroup:
        """Move process ``pid`` into a new cgroup ``name`` limited to ``limit_bytes``.

        Memory the process touched before the move stays charged where it was (a process
        placed right after its spawn has touched next to nothing). A stale cgroup of that
        name with no process in it (a manager that died) is replaced. Raises
        :class:`CgroupError`, leaving no directory behind, when the name or limit is bad,
        the process has exited, or the kernel refuses.
        """
        if not _NAME.fullmatch(name) or name == SUPERVISOR_LEAF:
            raise CgroupError(
                f"{name!r} cannot name a bot cgroup: use letters, digits, '-' and '_' "
                f"(not {SUPERVISOR_LEAF!r}), like bot-<id>-<instance>"
            )
        if limit_bytes <= 0:
            raise CgroupError(f"memory limit {limit_bytes} for {name} must be a positive size")
        path = self.root / name
        _make_fresh(path)
        try:
            self._configure(path, limit_bytes)
            # The limit is set before the process moves in: it is never unlimited there.
            (path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.rmdir()
            if exc.errno == errno.ESRCH:
                raise CgroupError(f"process {pid} exited before it was placed in {name}") from exc
            raise CgroupError(
                f"cannot place process {pid} in {path} ({exc.strerror}): check the manager "
                "owns that cgroup"
            ) from exc
        log.info(
            "bot process placed in its memory cgroup",
            pid=pid,
            cgroup=name,
            limit=format_size(limit_bytes),
            mode=str(self.mode),
        )
        return BotCgroup(
            path, limit_bytes, usage_file=self._usage_file, events_file=self._events_file
        )

    @abstractmethod
    def _configure(self, path: Path, limit_bytes: int) -> None:
        """Set the limit files of the new cgroup ``path``."""

    def __repr__(self) -> str:
        return f"<CgroupLimiter mode={self.mode} root={self.root}>"


class V2Limiter(CgroupLimiter):
    mode = Enforcement.CGROUP_V2
    _usage_file = "memory.current"
    _events_file = "memory.events"

    def _configure(self, path: Path, limit_bytes: int) -> None:
        (path / "memory.max").write_text(str(limit_bytes))
        if (path / "memory.swap.max").exists():  # absent without swap support in the kernel
            (path / "memory.swap.max").write_text("0")
        if (path / "memory.oom.group").exists():  # an OOM kill ends the whole bot, not a part
            (path / "memory.oom.group").write_text("1")


class V1Limiter(CgroupLimiter):
    mode = Enforcement.CGROUP_V1
    _usage_file = "memory.usage_in_bytes"
    _events_file = "memory.oom_control"

    def _configure(self, path: Path, limit_bytes: int) -> None:
        (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        # memory+swap at the same value: no swap beyond the limit. Present only with swap
        # accounting; it may never be below memory.limit_in_bytes, so it is set second.
        if (path / "memory.memsw.limit_in_bytes").exists():
            (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))


def _make_fresh(path: Path) -> None:
    """Create the cgroup ``path``, replacing an empty stale one (its counters are not ours)."""
    try:
        path.mkdir()
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise CgroupError(
            f"cannot create {path} ({exc.strerror}): check the manager owns {path.parent}"
        ) from exc
    try:
        left = (path / "cgroup.procs").read_text().split()
        if left:
            raise CgroupError(
                f"{path} exists and holds processes {', '.join(left)}: another manager uses "
                "this cgroup; stop it, or give each manager a cgroup of its own"
            )
        log.info("replacing a stale bot cgroup", cgroup=str(path))
        path.rmdir()
        path.mkdir()
    except OSError as exc:
        raise CgroupError(f"cannot replace the stale cgroup {path} ({exc.strerror})") from exc


class SlotCgroups:
    """The memory cgroups of the running bot processes, by slot (``<bot>-<instance>``).

    Without a limiter every call does nothing: the coordinator's RSS polling applies.
    """

    def __init__(self, limiter: CgroupLimiter | None) -> None:
        self.limiter = limiter
        self._cgroups: dict[str, BotCgroup] = {}

    def place(self, slot: str, pid: int, limit_bytes: int) -> None:
        """Put the slot's new process ``pid`` in a cgroup of ``limit_bytes``; a refusal is
        logged, and that process then runs under RSS polling only."""
        if self.limiter is None:
            return
        try:
            self._cgroups[slot] = self.limiter.place(pid, f"bot-{slot}", limit_bytes)
        except CgroupError as exc:
            log.warning(
                "bot process runs without its kernel memory limit; RSS polling applies",
                slot=slot,
                pid=pid,
                error=str(exc),
            )

    def oom_reason(self, slot: str) -> str | None:
        """Why the slot's exited process died, if the kernel killed it over its limit."""
        cgroup = self._cgroups.get(slot)
        try:
            if cgroup is None or cgroup.oom_kills() == 0:
                return None
        except CgroupError:
            return None
        limit = format_size(cgroup.limit_bytes)
        reason = f"killed by the kernel: over its memory_limit of {limit}"
        log.error(reason, slot=slot)
        return reason

    async def remove(self, slot: str) -> None:
        """Remove the slot's cgroup once its process exited, killing what it left there."""
        cgroup = self._cgroups.pop(slot, None)
        if cgroup is not None:
            await cgroup.remove()
