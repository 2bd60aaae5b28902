"""The import directions README.md's Layout section promises, checked on the source.

Every ``import`` counts, also one inside a function (a lazy import is still a dependency);
only imports under ``if TYPE_CHECKING:`` (names for annotations) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The manager's base modules (manager/*.py): any part may import them.
BASE = "manager"
#: What each part may import besides ``bus``, third-party packages and the base modules.
ALLOWED: dict[str, set[str]] = {
    "bus": set(),
    "bots": set(),
    BASE: set(),
    "manager.embedded": set(),
    "manager.observe": set(),
    "manager.supervision": {"manager.embedded", "manager.observe"},
    "manager.archive": {"manager.observe"},
    "manager.api": {
        "manager.archive", "manager.supervision", "manager.observe", "manager.embedded",
    },
    "manager.daemon": {
        "manager.api", "manager.archive", "manager.supervision", "manager.observe",
        "manager.embedded",
    },
    "manager.cli": {
        "manager.daemon", "manager.api", "manager.archive", "manager.supervision",
        "manager.observe", "manager.embedded",
    },
    "manager.bench": {
        "manager.cli", "manager.daemon", "manager.api", "manager.archive",
        "manager.supervision", "manager.observe", "manager.embedded",
    },
    "manager.soak": {
        "manager.bench", "manager.cli", "manager.daemon", "manager.api", "manager.archive",
        "manager.supervision", "manager.observe", "manager.embedded",
    },
}  # fmt: skip


def part_of(module: str) -> str | None:
    """The part a module belongs to (``manager.archive.trimmer`` → ``manager.archive``)."""
    top, _, rest = module.partition(".")
    if top in ("bus", "bots"):
        return top
    if top != "manager":
        return None  # the standard library or a third-party package
    sub = rest.split(".")[0]
    return f"manager.{sub}" if sub and (ROOT / "manager" / sub).is_dir() else BASE


def imports(path: Path) -> list[str]:
    """The modules ``path`` imports at run time."""
    tree = ast.parse(path.read_text(), str(path))
    for_types = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in for_types:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def sources() -> list[Path]:
    """Every Python file of bus/, bots/ and manager/."""
    return sorted(p for top in ("bus", "bots", "manager") for p in (ROOT / top).rglob("*.py"))


def test_every_part_imports_only_what_it_may() -> None:
    """bus imports neither manager nor bots; bots import only bus; each part of manager
    imports downward only. A violation names the file and the import."""
    wrong = []
    for path in sources():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        part = part_of(module)
        assert part in ALLOWED, f"{path}: a part the Layout does not name ({part})"
        for target in imports(path):
            other = part_of(target)
            if other in (None, part, "bus") or (other == BASE and part.startswith("manager")):
                continue
            if other not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT)}: {part} imports {target}")
    assert wrong == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from manager.daemon.manager import Manager\n", ["manager.daemon.manager"]),
        ("def f():\n    import manager.cli\n", ["manager.cli"]),
        ("if TYPE_CHECKING:\n    from manager.api import app\n", []),
    ],
)
def test_the_check_sees_lazy_imports_and_skips_type_only_ones(
    tmp_path: Path, source: str, expected: list[str]
) -> None:
    """A function-level import counts; an import for annotations does not."""
    path = tmp_path / "module.py"
    path.write_text(source)
    assert imports(path) == expected
