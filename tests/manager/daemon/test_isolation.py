"""Tests for manager.daemon.isolation: whether bots can get OS users of their own, and which."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager.config import BotConfig
from manager.daemon.isolation import BotUsers, OsUserError, missing_capabilities
from manager.embedded.child_process import OsUser, child_setup

ME = OsUser.current()


def bot(index: int = 0, **fields: str) -> BotConfig:
    """A bot named ``b<index>`` with ``fields`` (user, group)."""
    return BotConfig.model_validate({"id": f"b{index}", "entry": "x:main", **fields})


def users(
    default: str = "", *, switching: bool = True, reserved: dict[int, str] | None = None
) -> BotUsers:
    """BotUsers with its data dir somewhere the tests never start in."""
    return BotUsers(
        default, switching=switching, reserved=reserved or {}, data_dir=Path("/nonexistent")
    )


@pytest.fixture
def closed_dir() -> Iterator[Path]:
    """A directory only its owner (root) may enter."""
    directory = Path(tempfile.mkdtemp(prefix="multibot-closed-"))
    directory.chmod(0o700)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class TestCapabilities:
    def test_reads_the_effective_set(self) -> None:
        """CapEff bits 7, 6 and 5 are CAP_SETUID, CAP_SETGID and CAP_KILL."""
        assert missing_capabilities("CapInh:\t0\nCapEff:\t00000000000000e0\n") == []
        assert missing_capabilities("CapEff:\t0000000000000020\n") == ["CAP_SETUID", "CAP_SETGID"]
        assert missing_capabilities("CapEff:\t00000000000000c0\n") == ["CAP_KILL"]
        assert missing_capabilities("Name:\tx\n") == ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"]

    def test_a_process_of_an_ordinary_user_cannot_switch(self) -> None:
        """The kernel's own view of a process running as nobody: none of the three."""
        if os.geteuid() != 0:
            pytest.skip("needs root to start a process as nobody")
        try:
            nobody = OsUser.named("nobody")
        except KeyError:
            pytest.skip("needs an OS user named nobody")
        sleeper = subprocess.Popen(["sleep", "30"], preexec_fn=child_setup(nobody))  # noqa: PLW1509 - as the manager spawns
        try:
            status = Path(f"/proc/{sleeper.pid}/status").read_text()
        finally:
            sleeper.kill()
            sleeper.wait()
        assert missing_capabilities(status) == ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"]


class TestBotUsers:
    def test_the_default_user_or_the_bots_own(self) -> None:
        """A bot runs as its ``user``, else the fleet's ``bot_user``; ``group`` replaces
        the user's primary group."""
        other = next(g for g in grp.getgrall() if g.gr_gid not in (0, ME.gid))
        found = users(ME.name)
        found.resolve([bot(0), bot(1, user=ME.name, group=other.gr_name)])
        assert found.user(bot(0)) == ME
        assert found.user(bot(1)) == OsUser(ME.name, ME.uid, other.gr_gid)
        assert found.names() == sorted([ME.name, f"{ME.name}:{other.gr_name}"])

    def test_shared_when_switching_is_impossible_or_unset(self) -> None:
        """No switching, or an empty bot_user: every bot runs as the manager (names empty)."""
        for found in (users("multibot-bot", switching=False), users("")):
            found.resolve([bot(0)])
            assert found.user(bot(0)) is None
            assert found.names() == []

    def test_a_missing_user_names_the_command_and_the_key(self) -> None:
        """A user that does not exist: useradd's command line and the setting to change,
        once for the fleet's default however many bots use it."""
        with pytest.raises(OsUserError) as caught:
            users("multibot-no-such-user").resolve([bot(0), bot(1)])
        message = str(caught.value)
        assert message.count("supervisor.bot_user: there is no OS user") == 1
        assert "useradd --system" in message and "multibot-no-such-user" in message
        with pytest.raises(OsUserError, match=r"bots\[1\]\.user: there is no OS user"):
            users(ME.name).resolve([bot(0), bot(1, user="multibot-no-such-user")])

    def test_the_built_in_default_falls_back_to_sharing_with_the_reason(self) -> None:
        """bot_user left at its built-in default and missing here (a first start as root):
        bots share the manager's user, and ``fallback`` says why and names useradd; a bot
        that names its own missing user is still refused."""
        implicit = BotUsers(
            "multibot-no-such-user", switching=True, reserved={}, data_dir=Path("/nonexistent"),
            explicit=False,
        )  # fmt: skip
        implicit.resolve([bot(0), bot(1)])
        assert implicit.user(bot(0)) is None and implicit.names() == []
        assert implicit.fallback is not None
        assert "there is no OS user 'multibot-no-such-user'" in implicit.fallback
        assert "useradd --system" in implicit.fallback
        implicit.resolve([])  # no bot yet: the default is checked all the same
        assert implicit.names() == [] and implicit.fallback is not None
        with pytest.raises(OsUserError, match=r"bots\[1\]\.user: there is no OS user"):
            implicit.resolve([bot(0), bot(1, user="multibot-no-such-user")])

    def test_a_named_user_without_switching_is_refused(self) -> None:
        """A bot that names a user when the manager cannot switch: refused, not ignored."""
        with pytest.raises(OsUserError, match=r"bots\[0\]\.user: .* needs a manager that can"):
            users(switching=False).resolve([bot(0, user=ME.name)])

    def test_reserved_users_and_root_group_are_refused(self) -> None:
        """Never root, the manager's or PostgreSQL's user, nor root's group."""
        reserved = {ME.uid: "the manager's own user"}
        with pytest.raises(OsUserError, match="is the manager's own user"):
            users(ME.name, reserved=reserved).resolve([bot(0)])
        root_group = grp.getgrgid(0).gr_name
        with pytest.raises(OsUserError, match=r"bots\[0\]\.group: .* root's group"):
            users(ME.name).resolve([bot(0, group=root_group)])

    def test_bots_never_start_in_the_data_dir(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The manager's working directory inside data_dir is refused."""
        data_dir = Path(tempfile.mkdtemp(prefix="multibot-data-"))
        try:
            monkeypatch.chdir(data_dir)
            found = BotUsers(ME.name, switching=True, reserved={}, data_dir=data_dir)
            with pytest.raises(OsUserError, match="start the manager from another directory"):
                found.resolve([bot(0)])
        finally:
            shutil.rmtree(data_dir)

    def test_a_user_who_cannot_reach_python_or_the_cwd_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, closed_dir: Path
    ) -> None:
        """Starting where the bot user cannot go: refused, naming the closed directory."""
        if os.geteuid() != 0:
            pytest.skip("needs root to own a directory closed to nobody")
        try:
            OsUser.named("nobody")
        except KeyError:
            pytest.skip("needs an OS user named nobody")
        monkeypatch.chdir(closed_dir)
        with pytest.raises(OsUserError) as caught:
            users("nobody").resolve([bot(0)])
        message = str(caught.value)
        assert "supervisor.bot_user: bots run as nobody, who cannot reach" in message
        assert "is closed to it" in message and "chmod o+rx" in message
