"""Run a child process as another OS user and tie its life to ours.

``child_setup`` makes a ``preexec_fn`` that works on the default asyncio loop and on uvloop
alike. uvloop takes ``preexec_fn`` (it calls it right after the fork) but rejects ``user=``,
``group=`` and ``extra_groups=``, so the user switch happens in the preexec function too, and
before the parent-death signal is set: the kernel clears that signal when the uid or gid
changes (CPython's own ``user=`` would run before ``preexec_fn``, which is also fine).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class OsUser:
    """An OS account a child process runs as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> OsUser:
        """Look the account up by name; raises KeyError if there is none."""
        entry = pwd.getpwnam(name)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    @classmethod
    def current(cls) -> OsUser:
        """The account this process runs as (its effective uid)."""
        uid = os.geteuid()
        try:
            return cls(pwd.getpwuid(uid).pw_name, uid, os.getegid())
        except KeyError:  # a uid with no passwd entry (containers run such)
            return cls(str(uid), uid, os.getegid())

    def __str__(self) -> str:
        return self.name


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, None elsewhere.

    Resolve it in the parent: the child must not dlopen (a loader lock held by another
    thread at fork time would never be released there).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies; a no-op off Linux.

    Meant for a ``preexec_fn`` (it runs in the child between fork and exec) and it lasts
    across exec. The "parent" is the *thread* that forked: spawn from one that lives as long
    as the child should, such as the event loop's, not from a short-lived worker thread.
    With ``parent_pid`` (read in the parent before the fork) it also closes the race in
    which the parent died before this call: the process then kills itself at once.
    """
    prctl = _prctl()
    if prctl is None:
        return
    if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


def drop_ambient_capabilities() -> None:
    """Clear this process's ambient capabilities (a no-op off Linux or before Linux 4.3).

    A manager given CAP_SETUID, CAP_SETGID and CAP_KILL as ambient capabilities (the systemd
    unit does) would hand them to every child across exec: a bot could then become any user
    again. With the ambient set empty, a child that is not root keeps no capability at exec.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def switch_user(user: OsUser) -> None:
    """Become ``user``, with its primary group and no supplementary groups (needs root)."""
    os.setgroups([])
    os.setgid(user.gid)  # as root, set*id sets the real, effective and saved ids together
    os.setuid(user.uid)


def child_setup(user: OsUser | None = None, umask: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` that switches to ``user`` (None: stay), sets ``umask`` (None: keep
    ours), then dies with this process.

    Call it in the parent, right before spawning, in the thread that spawns.
    """
    _prctl()
    parent_pid = os.getpid()

    def setup() -> None:
        drop_ambient_capabilities()  # no child keeps the manager's (a bot least of all)
        if user is not None:
            switch_user(user)
        if umask is not None:
            os.umask(umask)
        die_with_parent(parent_pid)  # after the switch, which would clear it

    return setup


def first_closed_dir(path: Path, user: OsUser, *, read: bool = False) -> Path | None:
    """The first directory on the way to ``path`` (or path itself) closed to ``user``, or None.

    Judged from the mode bits (search/execute; with ``read``, also read on ``path`` itself,
    as listing a directory needs) for a child that ``child_setup`` switched to ``user``: its
    primary group only, and ACLs are not read.
    """
    resolved = path.resolve()
    for step in (*reversed(resolved.parents), resolved):
        info = step.stat()
        if info.st_uid == user.uid:
            bits = stat.S_IXUSR | (stat.S_IRUSR if read and step == resolved else 0)
        elif info.st_gid == user.gid:
            bits = stat.S_IXGRP | (stat.S_IRGRP if read and step == resolved else 0)
        else:
            bits = stat.S_IXOTH | (stat.S_IROTH if read and step == resolved else 0)
        if info.st_mode & bits != bits:
            return step
    return None


def chown_tree(top: Path, user: OsUser) -> None:
    """Give ``top`` and everything under it to ``user`` (symlinks themselves, not targets)."""
    os.chown(top, user.uid, user.gid, follow_symlinks=False)
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)
