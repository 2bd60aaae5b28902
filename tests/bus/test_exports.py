"""``bus`` exports what a bot author uses, each from the module that defines it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import bus


@pytest.mark.parametrize("name", bus.__all__)
def test_every_exported_name_resolves_to_its_definition(name: str) -> None:
    """``bus.X`` is the object its home module defines (loaded on first use)."""
    value = getattr(bus, name)
    home = importlib.import_module(value.__module__)
    assert getattr(home, name) is value


def test_unknown_names_are_an_attribute_error() -> None:
    """A typo is an AttributeError naming it, as for any module."""
    with pytest.raises(AttributeError, match="no attribute 'BusClinet'"):
        _ = bus.BusClinet


def test_importing_one_module_does_not_load_the_whole_bus() -> None:
    """``import bus.errors`` (what a tool needs) leaves the client and pydantic unloaded."""
    script = "import sys, bus.errors; print(sorted(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
    )
    assert "bus.client" not in done.stdout
    assert "pydantic" not in done.stdout
