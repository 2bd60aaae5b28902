"""Seeing a bot's processes in /proc when /proc hides other users' processes.

The systemd unit mounts /proc with ``hidepid=invisible`` (``ProtectProc=invisible``): a
process sees only the processes it may inspect, so a bot sees neither the manager nor
Redis, PostgreSQL or another user's bots. The manager does not see its own bots either
when they run under their own OS user. The kernel decides with the reader's *filesystem*
ids (``PTRACE_MODE_READ_FSCREDS``), and Linux keeps those per thread: a thread holding
CAP_SETUID and CAP_SETGID that takes the bot user's fsuid and fsgid for a moment sees that
user's processes, and nothing changes for the manager's other threads. :func:`seeing_as`
does that around a read.

A bot that makes itself non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``) stays hidden even
then; readers get "no such process" and must say that they could not look.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class OsIds(Protocol):
    """An OS account's ids (``manager.embedded.child_process.OsUser`` is one)."""

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...


@functools.cache
def _fs_id_calls() -> tuple[Callable[[int], int], Callable[[int], int]] | None:
    """libc's setfsuid and setfsgid on Linux, None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.setfsuid, libc.setfsgid
    except (OSError, AttributeError):
        return None


@contextmanager
def seeing_as(user: OsIds | None) -> Iterator[None]:
    """Read /proc as ``user`` sees it, in this thread, for the ``with`` block.

    Nothing happens for None or for this process's own user. Without CAP_SETUID and
    CAP_SETGID the kernel leaves the ids as they are, and the block sees what it saw before.
    The ids are restored on the way out, also after an exception: they are the effective
    ids, which a process may always set its filesystem ids back to.
    """
    calls = _fs_id_calls()
    if user is None or calls is None or user.uid == os.geteuid():
        yield
        return
    setfsuid, setfsgid = calls
    gid = setfsgid(user.gid)  # both return the previous id
    uid = setfsuid(user.uid)
    try:
        yield
    finally:
        setfsuid(uid)
        setfsgid(gid)


def running_child(pid: int) -> bool:
    """Whether ``pid`` is a child of ours that has not exited: what the kernel says to its
    parent, whatever /proc shows (the child is not reaped: ``WNOWAIT``)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped already, or not our child
        return False
