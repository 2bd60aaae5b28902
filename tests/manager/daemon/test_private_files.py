"""Tests for manager.daemon.private_files: the data directory is the manager's only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from manager.daemon.private_files import DataDirError, secure_data_dir
from manager.embedded.child_process import OsUser


def mode(path: Path) -> int:
    """The permission bits of ``path`` (not following a symlink)."""
    return stat.S_IMODE(path.lstat().st_mode)


def made(path: Path, permissions: int, text: str = "x") -> Path:
    """``path`` created with ``text`` and then ``permissions``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(permissions)
    return path


class TestModes:
    def test_wider_modes_are_tightened_with_one_warning(self, tmp_path: Path) -> None:
        """0644 files, 0755 directories and an 0755 data dir end 0600/0700/0700, named in
        one warning; a second start finds nothing to say."""
        data = tmp_path / "data"
        token = made(data / "api-admin.token", 0o644)
        conf = made(data / "redis" / "redis.conf", 0o640)
        script = made(data / "tool.sh", 0o755)
        (data / "redis").chmod(0o755)
        data.chmod(0o755)
        with capture_logs() as logs:
            secure_data_dir(data)
        assert [mode(p) for p in (data, data / "redis", token, conf, script)] == [
            0o700, 0o700, 0o600, 0o600, 0o700
        ]  # fmt: skip
        (warning,) = [entry for entry in logs if entry["log_level"] == "warning"]
        assert f"{token} (644 → 600)" in warning["tightened"]
        assert len(warning["tightened"]) == 5
        with capture_logs() as again:
            secure_data_dir(data)
        assert again == []

    def test_traversable_data_dir_for_postgres(self, tmp_path: Path) -> None:
        """For an embedded PostgreSQL of another user the data dir is 0711, nothing more."""
        data = tmp_path / "data"
        secret = made(data / "postgres.password", 0o644)
        secure_data_dir(data, traversable=True)
        assert mode(data) == 0o711 and mode(secret) == 0o600

    def test_symlinks_are_not_followed(self, tmp_path: Path) -> None:
        """A symlink in the data dir does not make its target the manager's business."""
        outside = made(tmp_path / "elsewhere.txt", 0o644)
        data = tmp_path / "data"
        data.mkdir()
        (data / "link").symlink_to(outside)
        secure_data_dir(data)
        assert mode(outside) == 0o644


class TestOwners:
    @pytest.fixture
    def nobody(self) -> OsUser:
        """nobody, to own a file (needs root to chown)."""
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another OS user")
        try:
            return OsUser.named("nobody")
        except KeyError:
            pytest.skip("needs an OS user named nobody")

    def test_files_of_other_users_are_refused(self, tmp_path: Path, nobody: OsUser) -> None:
        """Another user's file in the data dir stops the start, named, with the fix."""
        data = tmp_path / "data"
        planted = made(data / "redis" / "password", 0o600)
        os.chown(planted, nobody.uid, nobody.gid)
        with pytest.raises(DataDirError) as caught:
            secure_data_dir(data)
        assert f"{planted} (uid {nobody.uid})" in str(caught.value)
        assert "chown -R" in str(caught.value)

    def test_the_embedded_postgres_subtree_is_its_users(
        self, tmp_path: Path, nobody: OsUser
    ) -> None:
        """Under the subtree given to PostgreSQL's user, its files are left as they are."""
        data = tmp_path / "data"
        cluster = made(data / "postgres" / "pgdata" / "PG_VERSION", 0o644)
        for path in (data / "postgres", data / "postgres" / "pgdata", cluster):
            os.chown(path, nobody.uid, nobody.gid)
        secure_data_dir(data, others={data / "postgres": nobody.uid})
        assert mode(cluster) == 0o644
