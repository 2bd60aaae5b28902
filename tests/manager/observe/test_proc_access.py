"""The manager measures bots of another OS user through a /proc that hides them
(``ProtectProc=invisible`` in the systemd unit), and says so when a bot hides itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from manager.observe.proc_access import running_child, seeing_as

REPO = Path(__file__).resolve().parents[3]

#: Run under a /proc mounted hidepid=invisible, as root without CAP_SYS_PTRACE and outside
#: group 0 (the mount's default ``gid=``), so that, like the unit's manager, it sees only the
#: processes whose ids match its own: starts two processes
#: as uid/gid 65532, one of which makes itself non-dumpable, and measures both ways.
PROGRAM = """
import json, subprocess, sys
from manager.embedded.child_process import OsUser, child_setup
from manager.observe.memory import tree_rss

bot = OsUser("probe-bot", 65532, 65532)
HOLD = "import sys; sys.stdin.read()"
HIDE = (  # prctl(PR_SET_DUMPABLE, 0)
    "import ctypes, sys; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); print(flush=True); "
    "sys.stdin.read()"
)
python = sys.argv[1]  # one the bot's user may run
plain = subprocess.Popen([python, "-c", HOLD], stdin=subprocess.PIPE,
                         preexec_fn=child_setup(bot), cwd="/")
hiding = subprocess.Popen([python, "-c", HIDE], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, preexec_fn=child_setup(bot), cwd="/")
hiding.stdout.readline()
found = {
    "blind": tree_rss(plain.pid),
    "as_owner": tree_rss(plain.pid, bot),
    "hidden": tree_rss(hiding.pid, bot),
    "own_after": tree_rss(__import__("os").getpid()),
}
for child in (plain, hiding):
    child.stdin.close()
    child.wait(timeout=30)
print(json.dumps(found))
"""


def under_hidden_proc(program: str) -> dict[str, int | None]:
    """``program``'s JSON output, run as described at :data:`PROGRAM` (skips where this
    machine cannot mount such a /proc: not root, or no unshare/setpriv)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a private /proc with hidepid=invisible")
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs unshare and setpriv (util-linux)")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs /usr/bin/python3 for the bot processes (any user may run it)")
    script = (
        "mount -t proc -o hidepid=invisible proc /proc && "
        'exec setpriv --regid=65531 --clear-groups --bounding-set=-sys_ptrace "$@"'
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         sys.executable, "-c", program, "/usr/bin/python3"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode and "unshare" in done.stderr and "Operation not permitted" in done.stderr:
        pytest.skip(f"this machine refuses a private mount namespace: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    found: dict[str, int | None] = json.loads(done.stdout.splitlines()[-1])
    return found


class TestUnderHiddenProc:
    def test_the_owners_view_sees_the_bot_and_a_hiding_bot_is_unknown(self) -> None:
        """Blind, the bot is invisible (None); as its owner, its memory is measured; a bot
        that made itself non-dumpable is None, never a made-up 0; and the thread's own view
        is back afterwards."""
        found = under_hidden_proc(PROGRAM)
        assert found["blind"] is None
        assert found["as_owner"] is not None and found["as_owner"] > 1_000_000
        assert found["hidden"] is None
        assert found["own_after"] is not None and found["own_after"] > 0


class TestSeeingAs:
    def test_own_user_and_none_change_nothing(self) -> None:
        """The filesystem ids stay ours for None and for our own user."""
        from manager.embedded.child_process import OsUser

        with seeing_as(None), seeing_as(OsUser.current()):
            assert _fs_ids() == (os.geteuid(), os.getegid())

    def test_ids_are_restored_after_an_exception(self) -> None:
        """Inside, the thread reads as the other user (where we may switch); after an
        exception, its ids are ours again."""
        from manager.embedded.child_process import OsUser

        other = OsUser("other", 65532, 65532)
        inside: list[tuple[int, int]] = []

        def fail() -> None:
            with seeing_as(other):
                inside.append(_fs_ids())
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            fail()
        if os.geteuid() == 0:
            assert inside == [(65532, 65532)]
        assert _fs_ids() == (os.geteuid(), os.getegid())


def _fs_ids() -> tuple[int, int]:
    """This thread's filesystem uid and gid, from /proc/thread-self/status."""
    lines = Path("/proc/thread-self/status").read_text().splitlines()
    ids = {line.split(":")[0]: line.split()[4] for line in lines if line.startswith(("Uid", "Gid"))}
    return int(ids["Uid"]), int(ids["Gid"])


class TestRunningChild:
    def test_running_then_exited_then_reaped(self) -> None:
        """True while our child runs; False once it exited (even unreaped) and once reaped,
        and for a pid that is not our child."""
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                 stdin=subprocess.PIPE)  # fmt: skip
        try:
            assert running_child(child.pid)
            assert child.stdin is not None
            child.stdin.close()
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            assert not running_child(child.pid)
        finally:
            child.wait(timeout=30)
        assert not running_child(child.pid)
        assert not running_child(os.getppid())
