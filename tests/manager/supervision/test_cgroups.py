"""Tests for manager.supervision.cgroups: the kernel kills a process over the memory limit
of its cgroup, and detection says why there is no cgroup to use.

The limit tests run real processes in real memory cgroups of this machine; they skip when
the test process has no memory cgroup it may divide. Detection's reasons are checked on
directory trees shaped like cgroupfs, since a real host has only one of those shapes.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from manager.supervision.cgroup_detect import detect
from manager.supervision.cgroups import (
    BotCgroup,
    CgroupError,
    CgroupLimiter,
    Enforcement,
    Unavailable,
)
from tests.support import wait_until

MiB = 1 << 20
#: A child that waits for a line on stdin (so it is placed before it allocates), touches
#: ``argv[1]`` MiB in 16 MiB chunks, says so, and waits for stdin to close.
HOG = """
import sys
sys.stdin.readline()
chunks = [b"x" * (16 << 20) for _ in range(int(sys.argv[1]) // 16)]
print("allocated", flush=True)
sys.stdin.read()
"""
#: A child that waits for a line, starts a sleeper in a session of its own (out of reach of
#: a kill of its process group), prints the sleeper's pid and exits.
ESCAPER = """
import subprocess, sys
sys.stdin.readline()
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                           start_new_session=True, stdout=subprocess.DEVNULL)
print(sleeper.pid, flush=True)
"""

#: Above the kernel's highest possible pid (PID_MAX_LIMIT): never a process.
NO_PID = (1 << 22) + 1

Spawn = Callable[[str, str], Awaitable[asyncio.subprocess.Process]]
Place = Callable[[int, int], BotCgroup]


@pytest.fixture(scope="module")
def limiter() -> CgroupLimiter:
    """The memory cgroup this test process may divide; skips when there is none.

    On a cgroup v2 host this moves the test process into a leaf, as it does the manager.
    """
    found = detect()
    if isinstance(found, Unavailable):
        pytest.skip(f"no writable memory cgroup: {found.reason}")
    return found


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start ``python -c script arg``; every process still running at the end is killed."""
    started: list[asyncio.subprocess.Process] = []

    async def start(script: str, arg: str = "") -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, arg, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
        await process.communicate()


@pytest.fixture
async def place(limiter: CgroupLimiter) -> AsyncIterator[Place]:
    """Place a pid in a new uniquely named cgroup; each is removed at the end, also on failure."""
    made: list[BotCgroup] = []

    def place_one(pid: int, limit_bytes: int) -> BotCgroup:
        cgroup = limiter.place(pid, f"bot-test-{uuid.uuid4().hex[:12]}", limit_bytes)
        made.append(cgroup)
        return cgroup

    yield place_one
    for cgroup in made:
        if not await cgroup.remove():  # the code under test failed: clean up without it
            await force_remove(cgroup.path)


async def force_remove(path: Path) -> None:
    """SIGKILL every process in the cgroup ``path`` and remove it, within 10 s."""

    def removed() -> bool:
        with suppress(ProcessLookupError, FileNotFoundError):
            for pid in (path / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    await wait_until(removed, timeout=10, what=f"{path} to be removed")


async def go(process: asyncio.subprocess.Process) -> None:
    """Tell a waiting child to go on."""
    assert process.stdin is not None
    process.stdin.write(b"go\n")
    await process.stdin.drain()


async def read_line(process: asyncio.subprocess.Process) -> str:
    """The child's next line of output, within 30 s."""
    assert process.stdout is not None
    return (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


class TestKernelLimit:
    async def test_a_process_over_its_limit_is_killed_by_the_kernel(
        self, spawn: Spawn, place: Place
    ) -> None:
        """64 MiB limit, 256 MiB touched: SIGKILL from the kernel, and oom_kills() says so."""
        process = await spawn(HOG, "256")
        cgroup = place(process.pid, 64 * MiB)
        assert cgroup.oom_kills() == 0
        await go(process)
        returncode = await asyncio.wait_for(process.wait(), 30)
        assert returncode == -signal.SIGKILL
        assert cgroup.oom_kills() == 1

    async def test_a_process_under_its_limit_lives_and_its_usage_is_counted(
        self, spawn: Spawn, place: Place
    ) -> None:
        """32 MiB touched under a 64 MiB limit: alive, counted in usage(), no OOM kill."""
        process = await spawn(HOG, "32")
        cgroup = place(process.pid, 64 * MiB)
        assert cgroup.pids() == [process.pid]
        await go(process)
        assert await read_line(process) == "allocated"
        assert process.returncode is None
        assert 32 * MiB <= cgroup.usage() < 64 * MiB
        assert cgroup.oom_kills() == 0
        assert process.stdin is not None
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert cgroup.oom_kills() == 0

    async def test_remove_leaves_no_directory(self, spawn: Spawn, place: Place) -> None:
        """After the process exited, remove() deletes the cgroup; again, it is a no-op."""
        process = await spawn(HOG, "0")
        cgroup = place(process.pid, 64 * MiB)
        assert cgroup.path.is_dir()
        process.kill()
        await asyncio.wait_for(process.wait(), 30)
        assert await cgroup.remove() is True
        assert not cgroup.path.exists()
        assert await cgroup.remove() is True

    async def test_remove_kills_what_the_process_left_behind(
        self, spawn: Spawn, place: Place
    ) -> None:
        """A child in a session of its own outlives the process but not its cgroup's removal."""
        process = await spawn(ESCAPER, "")
        cgroup = place(process.pid, 64 * MiB)
        await go(process)
        sleeper = int(await read_line(process))
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert cgroup.pids() == [sleeper]
        with capture_logs() as logs:
            assert await cgroup.remove() is True
        assert not cgroup.path.exists()
        await wait_until(lambda: gone(sleeper), timeout=10, what="the sleeper to die")
        [killing] = [e for e in logs if e["event"] == "killing what the bot left in its cgroup"]
        assert killing["pids"] == [sleeper]

    async def test_a_name_in_use_is_refused_and_a_stale_one_is_replaced(
        self, spawn: Spawn, limiter: CgroupLimiter
    ) -> None:
        """A cgroup of that name with a process in it is refused; once empty (its manager
        died), the next place() takes it over."""
        first, second = await spawn(HOG, "0"), await spawn(HOG, "0")
        path = limiter.root / f"bot-test-{uuid.uuid4().hex[:12]}"
        try:
            limiter.place(first.pid, path.name, 64 * MiB)
            with pytest.raises(CgroupError, match=f"holds processes {first.pid}"):
                limiter.place(second.pid, path.name, 64 * MiB)
            first.kill()
            await asyncio.wait_for(first.wait(), 30)
            assert limiter.place(second.pid, path.name, 64 * MiB).pids() == [second.pid]
        finally:
            await force_remove(path)

    async def test_placing_an_exited_process_fails_and_leaves_nothing(
        self, spawn: Spawn, limiter: CgroupLimiter
    ) -> None:
        """A process that is gone cannot be placed: a clear error, and no cgroup is left."""
        process = await spawn("pass", "")
        await asyncio.wait_for(process.wait(), 30)
        path = limiter.root / f"bot-test-{uuid.uuid4().hex[:12]}"
        try:
            with pytest.raises(CgroupError, match=f"process {process.pid} exited"):
                limiter.place(process.pid, path.name, 64 * MiB)
            assert not path.exists()
        finally:
            if path.exists():
                await force_remove(path)

    async def test_a_name_that_is_not_one_directory_is_refused(
        self, limiter: CgroupLimiter
    ) -> None:
        """Paths, dotted names (the kernel's files) and the supervisor's leaf are refused."""
        for name in ("../escape", "a/b", "memory.max", "supervisor", ""):
            with pytest.raises(CgroupError, match="cannot name a bot cgroup"):
                limiter.place(NO_PID, name, 64 * MiB)


class FakeHost:
    """A directory tree shaped like a host's cgroupfs, and the /proc/self files naming it."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.proc = top / "proc"
        self.proc.mkdir()
        self._cgroup_lines: list[str] = []
        self._mount_lines: list[str] = []

    def v2(
        self,
        path: str,
        controllers: str = "cpu memory pids",
        *,
        ro: bool = False,
        mine: bool = True,
    ) -> Path:
        """A cgroup v2 ``path`` with ``controllers`` available; the process's own if ``mine``."""
        mount = self.top / "cgroup2"
        self._mount(mount, "cgroup2", "ro" if ro else "rw", "rw,nsdelegate")
        if mine:
            self._cgroup_lines.append(f"0::{path}")
        directory = mount / path.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("cgroup.procs", "cgroup.subtree_control"):
            (directory / name).write_text("")
        (directory / "cgroup.controllers").write_text(controllers + "\n")
        if not (mount / "cgroup.controllers").exists():  # the hierarchy's root
            (mount / "cgroup.controllers").write_text("cpu memory pids\n")
        if path != "/":
            (directory / "cgroup.type").write_text("domain\n")
        return directory

    def v1_memory(self, path: str) -> Path:
        """The process's cgroup in a v1 memory hierarchy is ``path``."""
        mount = self.top / "memory"
        self._mount(mount, "cgroup", "rw", "rw,memory")
        self._cgroup_lines.append(f"4:memory:{path}")
        directory = mount / path.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        return directory

    def ready(self) -> None:
        """Write the /proc files; make every part readable by anyone (write bits kept)."""
        (self.proc / "cgroup").write_text("".join(f"{line}\n" for line in self._cgroup_lines))
        (self.proc / "mountinfo").write_text("".join(f"{m}\n" for m in self._mount_lines))
        for path in self.top.rglob("*"):
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))

    def _mount(self, point: Path, fstype: str, options: str, super_options: str) -> None:
        if any(f" {point} " in line for line in self._mount_lines):
            return
        n = len(self._mount_lines) + 30
        self._mount_lines.append(
            f"{n} 23 0:{n} / {point} {options},nosuid,nodev - {fstype} {fstype} {super_options}"
        )

    def detect(self) -> CgroupLimiter | Unavailable:
        """Detection on this tree."""
        self.ready()
        return detect(self.proc)


@pytest.fixture
def host() -> Iterator[FakeHost]:
    """A fake host under a temporary directory others may read (for the non-root case)."""
    top = Path(tempfile.mkdtemp(prefix="fake-cgroupfs-"))
    top.chmod(0o755)
    try:
        yield FakeHost(top)
    finally:
        for path in [top, *top.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(top)


@contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block as the user nobody when we are root (root may write anything)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to test an unwritable cgroup as")
    uid, gid = os.geteuid(), os.getegid()
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(uid)
        os.setegid(gid)


def reason_of(found: CgroupLimiter | Unavailable) -> str:
    assert isinstance(found, Unavailable), f"expected no limiter, got {found!r}"
    assert found.mode is Enforcement.POLLING
    return found.reason


class TestDetection:
    def test_v2_cgroup_not_writable_says_to_delegate(self, host: FakeHost) -> None:
        """Not delegated (not ours to write): the reason names it and Delegate=yes."""
        service = host.v2("/system.slice/multibot.service")
        for path in (service, *service.iterdir()):
            path.chmod(0o555 if path.is_dir() else 0o444)
        host.ready()
        with unprivileged():
            reason = reason_of(detect(host.proc))
        assert f"cgroup v2: {service} is not writable by" in reason
        assert "run the manager under systemd with Delegate=yes" in reason

    def test_v2_read_only_mount_names_protect_control_groups(self, host: FakeHost) -> None:
        """A read-only cgroupfs (ProtectControlGroups=yes): the reason says which setting."""
        host.v2("/system.slice/multibot.service", ro=True)
        reason = reason_of(host.detect())
        assert "is mounted read-only" in reason
        assert "ProtectControlGroups=no" in reason

    def test_v2_memory_controller_missing_names_what_there_is(self, host: FakeHost) -> None:
        """Delegated without memory: the reason lists the controllers there are."""
        service = host.v2("/system.slice/multibot.service", controllers="cpu pids")
        reason = reason_of(host.detect())
        assert f"the memory controller is not available in {service} (it has cpu pids)" in reason
        assert "Delegate=yes" in reason

    def test_v2_root_cgroup_is_not_divided(self, host: FakeHost) -> None:
        """A manager in the hierarchy's root cgroup is told to get a cgroup of its own."""
        root = host.v2("/")
        reason = reason_of(host.detect())
        assert f"the manager runs in the root cgroup ({root})" in reason
        assert "Delegate=yes" in reason

    def test_v2_in_the_supervisor_leaf_checks_the_delegated_parent(self, host: FakeHost) -> None:
        """Started in supervisor/ (DelegateSubgroup=supervisor): the parent is what is divided."""
        service = host.v2("/system.slice/multibot.service", controllers="cpu", mine=False)
        host.v2("/system.slice/multibot.service/supervisor")
        reason = reason_of(host.detect())
        assert f"not available in {service} (it has cpu)" in reason

    def test_v1_memory_cgroup_not_writable_says_root(self, host: FakeHost) -> None:
        """cgroup v1 memory, not writable: only root can use it, or a v2 host with systemd."""
        directory = host.v1_memory("/system.slice/multibot.service")
        directory.chmod(0o555)
        host.ready()
        with unprivileged():
            reason = reason_of(detect(host.proc))
        assert f"cgroup v1: {directory} is not writable by" in reason
        assert "only root may limit the bots' memory" in reason

    def test_hybrid_host_gives_both_reasons(self, host: FakeHost) -> None:
        """Memory in v1, v2 without it: each hierarchy's reason is there, v2's first."""
        host.v2("/system.slice/multibot.service", controllers="")
        (host.top / "cgroup2" / "cgroup.controllers").write_text("cpu io pids\n")
        memory = host.v1_memory("/system.slice/multibot.service")
        memory.chmod(0o555)
        host.ready()
        with unprivileged():
            reason = reason_of(detect(host.proc))
        v2, v1 = reason.split("; cgroup v1: ")
        assert v2 == "cgroup v2: memory is not a cgroup v2 controller here: it is mounted as v1"
        assert v1.startswith(f"{memory} is not writable")

    def test_v2_without_memory_anywhere_says_to_delegate_it(self, host: FakeHost) -> None:
        """A v2-only host whose hierarchy (as mounted) has no memory: delegate it."""
        host.v2("/system.slice/multibot.service", controllers="cpu")
        (host.top / "cgroup2" / "cgroup.controllers").write_text("cpu\n")
        reason = reason_of(host.detect())
        assert reason.startswith(f"cgroup v2: memory is not a controller in {host.top / 'cgroup2'}")
        assert "Delegate=yes" in reason

    def test_no_memory_hierarchy_mounted(self, host: FakeHost) -> None:
        """No cgroup mount at all: the reason says so and what to run under."""
        reason = reason_of(host.detect())
        assert reason.startswith("no cgroup hierarchy with the memory controller is mounted")
        assert "Delegate=yes" in reason
