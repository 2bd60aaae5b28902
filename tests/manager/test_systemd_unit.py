"""Tests for systemd/multibot.service: systemd accepts it, and it keeps the manager's contract."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "multibot.service"
PRODUCTION_MULTIBOT = "/opt/multibot/.venv/bin/multibot"
_EXEC_KEYS = ("ExecStart", "ExecReload")
_EXEC_PREFIXES = "-@:+!"  # ExecStart=-/bin/x etc.: flags before the program path


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """The ``[Section] Key=value`` assignments of a unit file; a repeated key keeps every value.

    Enough of systemd's syntax for our unit: comments, blank lines, sections, assignments
    (configparser merges or rejects repeated keys, which systemd allows).
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        if current is None or not equals or line.endswith("\\"):
            raise ValueError(f"line {number}: cannot parse {raw!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _stand_in(program: str) -> str:
    """``program`` if it exists here, else an executable that does, preferring the same name.

    The unit names the production paths (/opt/multibot/.venv/bin/multibot); verify checks
    that they are executable, which they are not on a development machine. The console
    script of this venv, beside sys.executable, is the same program installed elsewhere.
    """
    if os.access(program, os.X_OK):
        return program
    name = Path(program).name
    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if os.access(beside_python, os.X_OK) else shutil.which(name)
    return found or sys.executable


def runnable_copy(text: str, directory: Path) -> Path:
    """Write ``text`` to ``directory/multibot.service`` with every Exec program made to exist."""
    lines = []
    for line in text.splitlines():
        key, equals, command = line.partition("=")
        if not equals or key.strip() not in _EXEC_KEYS:
            lines.append(line)
            continue
        flags = command[: len(command) - len(command.lstrip(_EXEC_PREFIXES))]
        program, _, arguments = command[len(flags) :].partition(" ")
        stand_in = _stand_in(program)
        quoted = f'"{stand_in}"' if " " in stand_in else stand_in
        lines.append(f"{key}={flags}{quoted} {arguments}".rstrip())
    copy = directory / UNIT.name
    copy.write_text("\n".join(lines) + "\n")
    copy.chmod(0o644)  # verify warns about executable or world-writable unit files
    return copy


def verify_findings(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` reports about ``unit`` itself (empty: it is valid).

    verify exits 0 even for unknown keys and bad values (it warns and ignores them), so we
    read its output. systemd attributes every unit problem to the unit (``/path/x.service:12:
    Unknown key`` or ``x.service: Command ... is not executable``); lines about other units
    (its dependencies, the host's own units) are the machine's business and are ignored.
    A failure without a line about the unit is the tool not working here: skip.
    """
    env = {
        **os.environ,
        "SYSTEMD_LOG_TARGET": "console",  # never the journal, even when run under systemd
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_LOG_TIME": "0",
        "SYSTEMD_LOG_LOCATION": "0",
        "SYSTEMD_LOG_LEVEL": "info",
    }
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    output = (done.stdout + done.stderr).splitlines()
    findings = [line for line in output if unit.name in line]
    if done.returncode != 0 and not findings:
        pytest.skip(f"systemd-analyze verify does not work here: {output}")
    return findings


def security_score(unit: Path) -> float:
    """``systemd-analyze security --offline=yes``'s overall exposure of ``unit`` (skips when
    this systemd cannot score a unit file offline)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    if found is None:
        pytest.skip(f"systemd-analyze cannot score a unit offline here: {done.stderr.strip()}")
    return float(found.group(1))


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
class TestVerify:
    def test_systemd_accepts_the_unit(self, tmp_path: Path) -> None:
        """systemd-analyze verify finds no unknown key, bad value or missing program."""
        copy = runnable_copy(UNIT.read_text(), tmp_path)
        assert verify_findings(copy) == []

    def test_catches_unknown_keys_and_bad_values(self, tmp_path: Path) -> None:
        """The check above would fail on a broken unit (it is not vacuous on this machine)."""
        broken = UNIT.read_text().replace("\nMemoryMax=2G\n", "\nMemoryMax=lots\nNoSuchKey=1\n")
        findings = verify_findings(runnable_copy(broken, tmp_path))
        assert any("NoSuchKey" in line for line in findings), findings
        assert any("lots" in line for line in findings), findings

    def test_catches_a_missing_program(self, tmp_path: Path) -> None:
        """Verify reports the production ExecStart path as missing, which is why we rewrite it."""
        unit = tmp_path / UNIT.name
        unit.write_text(UNIT.read_text().replace("/opt/multibot/", str(tmp_path / "absent") + "/"))
        unit.chmod(0o644)
        findings = verify_findings(unit)
        assert any("absent" in line for line in findings), findings


class TestRunnableCopy:
    def test_only_exec_programs_change(self, tmp_path: Path) -> None:
        """The copy keeps every line but swaps missing Exec programs for existing ones."""
        original = parse_unit(UNIT.read_text())["Service"]
        copy = parse_unit(runnable_copy(UNIT.read_text(), tmp_path).read_text())["Service"]
        assert {k: v for k, v in copy.items() if k not in _EXEC_KEYS} == {
            k: v for k, v in original.items() if k not in _EXEC_KEYS
        }
        [start] = copy["ExecStart"]
        program, arguments = start.split(" ", 1)
        assert os.access(program, os.X_OK)
        assert arguments == "start --config /etc/multibot/multibot.toml"
        assert copy["ExecReload"][0].endswith(" -HUP $MAINPID")


@pytest.fixture
def unit() -> dict[str, dict[str, list[str]]]:
    """The parsed unit file."""
    return parse_unit(UNIT.read_text())


class TestContract:
    @staticmethod
    def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
        """The single value of ``key`` in ``section``; fails if it is missing or repeated."""
        values = unit[section].get(key, [])
        assert len(values) == 1, f"[{section}] {key} should be set once, is {values}"
        return values[0]

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("OOMPolicy", "continue"),
            ("MemoryMax", "2G"),
            ("KillMode", "mixed"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("Restart", "on-failure"),
            ("StateDirectory", "multibot"),
            ("ExecStart", f"{PRODUCTION_MULTIBOT} start --config /etc/multibot/multibot.toml"),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
            # Exactly what switching bots to their own OS users needs, nothing more.
            ("CapabilityBoundingSet", "CAP_SETUID CAP_SETGID CAP_KILL"),
            ("AmbientCapabilities", "CAP_SETUID CAP_SETGID CAP_KILL"),
            ("UMask", "0077"),
            ("StateDirectoryMode", "0700"),
        ],
    )
    def test_service_setting(
        self, unit: dict[str, dict[str, list[str]]], key: str, value: str
    ) -> None:
        """Each setting the manager relies on has its agreed value."""
        assert self.one(unit, "Service", key) == value

    def test_watchdog_is_set(self, unit: dict[str, dict[str, list[str]]]) -> None:
        """WatchdogSec is a positive number of seconds, so the manager's pings are checked."""
        match = re.fullmatch(r"(\d+)s?", self.one(unit, "Service", "WatchdogSec"))
        assert match is not None
        assert int(match.group(1)) > 0

    def test_runs_as_a_dedicated_user(self, unit: dict[str, dict[str, list[str]]]) -> None:
        """The service runs as a static non-root user and group."""
        assert self.one(unit, "Service", "User") not in ("root", "0", "")
        assert self.one(unit, "Service", "Group") not in ("root", "0", "")
        assert "DynamicUser" not in unit["Service"]

    @needs_systemd_analyze
    def test_cgroup_drop_in_is_accepted(self, tmp_path: Path) -> None:
        """The drop-in that delegates memory cgroups loads on top of the unit."""
        drop_in = UNIT.parent / "multibot-cgroups.conf"
        text = drop_in.read_text()
        assert "Delegate=memory" in text and "ProtectControlGroups=no" in text
        # A drop-in's keys merge into the unit: verify the unit with them appended.
        assert verify_findings(runnable_copy(UNIT.read_text() + "\n" + text, tmp_path)) == []

    @needs_systemd_analyze
    def test_local_drop_in_is_accepted_and_scores_better(self, tmp_path: Path) -> None:
        """The drop-in for a fleet that talks only to this host loads on top of the unit,
        and lowers `systemd-analyze security`'s exposure further."""
        text = (UNIT.parent / "multibot-local.conf").read_text()
        assert "IPAddressDeny=any" in text and "IPAddressAllow=localhost" in text
        local = runnable_copy(UNIT.read_text() + "\n" + text, tmp_path)
        assert verify_findings(local) == []
        alone = tmp_path / "alone"
        alone.mkdir()
        assert security_score(local) < security_score(runnable_copy(UNIT.read_text(), alone))

    @needs_systemd_analyze
    def test_the_unit_scores_no_worse_than_before_bots_had_users(self, tmp_path: Path) -> None:
        """`systemd-analyze security` rates the unit at most 1.9, its score before it gained
        the capabilities that run bots as their own users; /proc hides other users'
        processes (the manager reads its bots' through their user's view)."""
        unit = runnable_copy(UNIT.read_text(), tmp_path)
        assert "ProtectProc=invisible" in UNIT.read_text()
        assert security_score(unit) <= 1.9

    def test_no_memory_deny_write_execute(self, unit: dict[str, dict[str, list[str]]]) -> None:
        """MemoryDenyWriteExecute stays off: ctypes and cffi need writable executable pages."""
        assert "MemoryDenyWriteExecute" not in unit["Service"]

    def test_memory_high_below_max(self, unit: dict[str, dict[str, list[str]]]) -> None:
        """MemoryHigh is set and below MemoryMax, so the kernel reclaims before it kills."""
        high = self.one(unit, "Service", "MemoryHigh")
        assert high.endswith("M")
        assert int(high[:-1]) < 2048

    def test_start_limits_are_in_unit_section(self, unit: dict[str, dict[str, list[str]]]) -> None:
        """StartLimitIntervalSec/Burst sit in [Unit], the only place systemd reads them."""
        assert self.one(unit, "Unit", "StartLimitIntervalSec")
        assert self.one(unit, "Unit", "StartLimitBurst")
        assert "StartLimitBurst" not in unit["Service"]

    def test_installed_for_boot(self, unit: dict[str, dict[str, list[str]]]) -> None:
        """Enabled units start at boot, once the network is online."""
        assert self.one(unit, "Install", "WantedBy") == "multi-user.target"
        assert "network-online.target" in self.one(unit, "Unit", "Wants")
        assert "network-online.target" in self.one(unit, "Unit", "After")
