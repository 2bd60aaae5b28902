"""requirements.lock pins every dependency pyproject.toml declares, at a version it allows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FIX = "run `make lock` and commit requirements.lock"


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
    ]


def _locked() -> dict[str, list[tuple[Version, Marker | None]]]:
    """Package → its pins (a universal lock may pin one package per Python version)."""
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line.startswith(("#", " ")):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^ ;]+)(?: ; (.+))?", line)
        assert match, f"requirements.lock: {line!r} is not `name==version [; marker]`: {FIX}"
        name, version, marker = match.groups()
        pins.setdefault(canonicalize_name(name), []).append(
            (Version(version), Marker(marker) if marker else None)
        )
    return pins


class TestLock:
    def test_every_declared_dependency_is_pinned_within_its_range(self) -> None:
        """A dependency added to or narrowed in pyproject.toml without re-locking fails here."""
        locked = _locked()
        for requirement in _declared():
            name = canonicalize_name(requirement.name)
            assert name in locked, f"{requirement.name} is declared but not locked: {FIX}"
            for version, _ in locked[name]:
                assert requirement.specifier.contains(version, prereleases=True), (
                    f"{requirement.name}=={version} in requirements.lock is outside "
                    f"{requirement.specifier} in pyproject.toml: {FIX}"
                )

    def test_extras_of_declared_dependencies_are_locked(self) -> None:
        """redis[hiredis] brings hiredis: the lock must pin the extras too."""
        assert "hiredis" in _locked(), f"redis[hiredis] declared, hiredis not locked: {FIX}"

    @pytest.mark.parametrize("tool", ["ruff", "mypy", "types-pyyaml"])
    def test_lint_tools_are_pinned_exactly(self, tool: str) -> None:
        """Lint and type-check tools add rules in new releases: pyproject pins them with ==."""
        (requirement,) = [r for r in _declared() if canonicalize_name(r.name) == tool]
        assert [s.operator for s in requirement.specifier] == ["=="], (
            f"{requirement} in pyproject.toml: pin it exactly (`{requirement.name}==X`)"
        )

    def test_lock_is_made_by_the_documented_command(self) -> None:
        """The header names the `make lock` command, so a hand-edited lock stands out."""
        header = (ROOT / "requirements.lock").read_text().splitlines()[1]
        makefile = (ROOT / "Makefile").read_text()
        assert "uv pip compile pyproject.toml --extra dev --universal" in header
        assert "uv pip compile pyproject.toml --extra dev --universal" in makefile
