"""Who connected to the control socket, and whether the manager answers it.

The socket file is 0600, so only the manager's user and root can connect; this is the second
layer, which holds even if the file's mode is changed: the kernel names the connecting process
(``SO_PEERCRED``: its uid and pid), and the manager answers only its own user and root, and
never a process it started (a bot, or anything a bot started: bots are hostile code).

A bot is recognised by its pid: the peer, or one of its ancestors (at most
:data:`MAX_ANCESTORS`), is a running bot process, or the peer is in a bot's session or process
group (each bot leads its own session, so a process a bot double-forked away still shows
it), or the manager itself is an ancestor (a bot spawned a moment ago, before the supervisor
recorded its pid). A process that left its bot's session and lost its parent is not
recognised: when bots share the manager's OS user, the pid check is a safety net, not the
boundary; bots under their own OS users are refused by uid whatever they do.

Pid reuse: the kernel gives a pidfd of the peer as it was at ``connect()`` (``SO_PEERPIDFD``,
Linux 6.5+); the check ends by confirming through it that the pid still names that process,
so a pid freed and reused while it was being checked is refused, not judged as the new
process. Older kernels have no such handle: there the check runs at once on accept, before
reading the request.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psutil

#: Parents followed from the peer up: deeper process trees than this are not walked further.
MAX_ANCESTORS = 64
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # <asm-generic/socket.h>; Linux 6.5+


class PeerSocket(Protocol):
    """What the check needs of a connected unix socket (asyncio's and uvloop's both fit)."""

    def getsockopt(self, level: int, option: int, buflen: int = ..., /) -> int | bytes:
        """As :meth:`socket.socket.getsockopt`."""
        ...


@dataclass(frozen=True, slots=True)
class Peer:
    """The process on the other end, as the kernel recorded it at ``connect()``."""

    pid: int
    uid: int
    gid: int


class PeerCheck:
    """Says whether the control server may answer a connected peer, and why not.

    ``is_bot(pid)`` says whether ``pid`` is a running bot process (the supervisor knows).
    """

    def __init__(self, is_bot: Callable[[int], bool]) -> None:
        self._is_bot = is_bot
        self._uid = os.geteuid()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<PeerCheck uid={self._uid} pid={self._pid}>"

    def refusal(self, sock: PeerSocket) -> tuple[Peer | None, str | None]:
        """The peer of ``sock`` and, if it must not be answered, the reason to tell it."""
        pidfd = _peer_pidfd(sock)
        try:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            except OSError as exc:  # not a unix socket, or not Linux
                return None, f"refused: cannot tell who connected ({exc})"
            assert isinstance(raw, bytes)
            peer = Peer(*_PEERCRED.unpack(raw))
            return peer, self._judge(peer, pidfd)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _judge(self, peer: Peer, pidfd: int | None) -> str | None:
        if peer.uid not in (0, self._uid):
            return (
                f"refused: the control socket answers only root and the manager's user "
                f"(uid {self._uid}); this process runs as uid {peer.uid}: run the command "
                "as one of them"
            )
        if peer.pid <= 0:
            return "refused: the kernel does not say which process connected"
        reason = self._started_by_us(peer.pid)
        if reason is None and pidfd is not None and _pidfd_pid(pidfd) != peer.pid:
            reason = f"refused: process {peer.pid} exited before it could be checked"
        return reason

    def _started_by_us(self, pid: int) -> str | None:
        """Why ``pid`` counts as a bot (or as started by the manager), or None."""
        lineage = _lineage(pid)
        groups = {_id(os.getsid, pid), _id(os.getpgid, pid)} - {None}
        if any(self._is_bot(p) for p in lineage) or any(self._is_bot(g) for g in groups if g):
            return (
                f"refused: process {pid} is a bot or was started by one; bots never use the "
                "control socket"
            )
        if self._pid in lineage[1:]:
            return (
                f"refused: process {pid} was started by the manager (a bot or one of its "
                "children); bots never use the control socket"
            )
        return None


def _lineage(pid: int) -> list[int]:
    """``pid`` and its ancestors, nearest first, at most MAX_ANCESTORS of them."""
    chain = [pid]
    while len(chain) < MAX_ANCESTORS:
        try:
            parent = psutil.Process(chain[-1]).ppid()
        except psutil.Error:
            break
        if parent <= 0 or parent in chain:
            break
        chain.append(parent)
    return chain


def _id(get: Callable[[int], int], pid: int) -> int | None:
    try:
        return get(pid)
    except OSError:
        return None


def _peer_pidfd(sock: PeerSocket) -> int | None:
    """A pidfd of the peer as it was at connect(); None where the kernel has none."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _pidfd_pid(pidfd: int) -> int | None:
    """The pid the pidfd's process has now: None (or -1) once it has exited."""
    with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return None
