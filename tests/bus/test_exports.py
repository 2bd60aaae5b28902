"""``bus`` exports what a bot author uses, each from the module that defines it."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import bus

BOTS = Path(__file__).parents[2] / "bots"
#: What a bot's code uses: the client, events, conditions, the errors its handlers and
#: publishes catch, dead letters, and the schemas the example bots parse.
BOT_AUTHOR_NAMES = {
    "BusBackpressureError",
    "BusClient",
    "BusConnectionError",
    "BusDurabilityError",
    "BusError",
    "DeadLetter",
    "DeadLetterNotFoundError",
    "DeadLetterReason",
    "DeadLetters",
    "Event",
    "EventType",
    "EventValidationError",
    "LoadBalanceRequired",
    "PublishError",
    "SchemaError",
    "SchemaRegistry",
    "SharedUserDetected",
    "SubscriptionError",
    "UserMessage",
    "Where",
}


def test_the_exports_are_what_a_bot_author_uses() -> None:
    """``bus`` exports exactly the names a bot's code needs, each once."""
    assert set(bus.__all__) == BOT_AUTHOR_NAMES
    assert len(bus.__all__) == len(BOT_AUTHOR_NAMES)


def test_no_settings_class_is_exported() -> None:
    """Settings are built by the manager from ``bus.settings``; ``bus`` does not offer them."""
    settings = importlib.import_module("bus.settings")
    for name in ("BusSettings", "ConsumerSettings", "RetrySettings", "BreakerSettings"):
        assert hasattr(settings, name)
        assert name not in bus.__all__
        with pytest.raises(AttributeError, match=name):
            getattr(bus, name)


@pytest.mark.parametrize("path", sorted(BOTS.glob("*.py")), ids=lambda path: path.name)
def test_the_example_bots_take_exported_names_from_bus(path: Path) -> None:
    """An example bot writes ``from bus import X`` for what ``bus`` exports, not
    ``from bus.<module> import X``: the examples show the public face."""
    reached = [
        f"from {node.module} import {alias.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bus.")
        for alias in node.names
        if alias.name in bus.__all__
    ]
    assert reached == []


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


def test_importing_bus_loads_neither_pydantic_nor_redis() -> None:
    """``import bus`` alone defers every export: no pydantic, no redis-py, no submodule."""
    script = "import sys, bus; print('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
    )
    loaded = set(done.stdout.split())
    assert "bus" in loaded
    assert not {m for m in loaded if m.split(".")[0] in {"pydantic", "redis"}}
    assert not {m for m in loaded if m.startswith("bus.")}


def test_a_bot_process_s_modules_load_no_pydantic() -> None:
    """The client, the runtime's protocol and the event types load without pydantic; the
    manager's RuntimeSpec (a pydantic model) is still named by ``bus.supervision``."""
    script = (
        "import sys, bus.client, bus.supervision, bus.schemas\n"
        "from bus import EventType, BusClient\n"
        "BusClient('x').schemas.check('x.y', {})\n"
        "print('pydantic' in sys.modules)\n"
        "from bus.supervision import RuntimeSpec\n"
        "print('pydantic' in sys.modules, RuntimeSpec.__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["False", "True", "bus.runtime_spec"]


def test_standard_schemas_load_with_the_first_standard_type() -> None:
    """A publish of a standard type still has its data checked: the schemas load then."""
    registry = bus.SchemaRegistry()
    registry.check("my.own.type", {"anything": 1})
    with pytest.raises(bus.SchemaError, match="user_id"):
        registry.check(bus.EventType.MESSAGE_RECEIVED, {"text": "hi"})
    assert registry.get(bus.EventType.MESSAGE_RECEIVED) is bus.UserMessage
