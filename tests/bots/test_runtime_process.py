"""What a bot process loads, and how it reads its spec: ``python -m bots.runtime`` run as the
manager runs it (bots.runtime.process, bots.runtime.imports, bus.supervision.read_spec)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from bus.plain_settings import PlainBusSettings
from bus.settings import BusSettings, ConsumerSettings, RetrySettings
from bus.supervision import (
    EXIT_CONFIG,
    PlainRuntimeSpec,
    RuntimeSpec,
    SpecError,
    read_spec,
    spec_json,
)
from tests.bots.runtime_probe import MODEL_ENV

ROOT = Path(__file__).resolve().parents[2]
#: Packages an idle bot without models must not load: pydantic (with its core and the
#: settings package) is about 9 MiB of its RSS; rich and greenlet come only with structlog.
HEAVY = {"pydantic", "pydantic_core", "pydantic_settings", "rich", "greenlet", "asyncpg"}
#: What every bot process loads: evidence the probe really ran the bus.
ALWAYS = {"bus.client", "bus.consumer", "bus.dispatcher", "redis.asyncio", "structlog", "uvloop"}


def probe_spec(redis_url: str) -> RuntimeSpec:
    """A spec shaped as the manager's (outbox, delivery records, declared subscriptions) for
    the probe bot, in a namespace of its own."""
    return RuntimeSpec(
        bot_id="probe",
        instance=0,
        entry="tests.bots.runtime_probe:main",
        bus=BusSettings(
            redis_url=redis_url,
            namespace=f"probe-{uuid.uuid4().hex[:8]}",
            outbox=True,
            delivery_records=True,
        ),
        subscriptions=[("probe.#", {})],
        manager_pid=os.getpid(),
    )


async def loaded_modules(spec: RuntimeSpec, *, model: bool) -> set[str]:
    """Run the probe bot as the manager does; the modules loaded once its consumer reads.
    It is then stopped as the manager stops it, and must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != MODEL_ENV}
    if model:
        env[MODEL_ENV] = "1"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.runtime",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write(spec_json(spec) + b"\n")
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        process.stdin.write(b"stop\n")
        process.stdin.close()
        _, errors = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert line, f"the probe bot reported nothing: {errors.decode(errors='replace')}"
    assert process.returncode == 0, errors.decode(errors="replace")
    return set(orjson.loads(line))


def heavy(modules: set[str]) -> set[str]:
    """The modules of :data:`HEAVY` packages among ``modules``."""
    return {m for m in modules if m.split(".")[0] in HEAVY}


@pytest.mark.redis
@pytest.mark.one_redis
class TestIdleBotImports:
    async def test_a_bot_without_models_loads_no_pydantic(self, redis_url: str) -> None:
        """An idle bot whose handler takes plain events loads the bus, not pydantic."""
        modules = await loaded_modules(probe_spec(redis_url), model=False)
        assert modules >= ALWAYS
        assert heavy(modules) == set()

    async def test_a_handler_with_a_model_loads_pydantic(self, redis_url: str) -> None:
        """``model=`` is what brings pydantic (and the standard schemas) in."""
        modules = await loaded_modules(probe_spec(redis_url), model=True)
        assert {"pydantic", "pydantic_core", "bus.catalog"} <= modules
        assert {m for m in heavy(modules) if m.split(".")[0] in {"rich", "greenlet"}} == set()


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter in the checkout; its output, checked."""
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


class TestImportStructlog:
    def test_structlog_loads_without_rich_and_greenlet(self) -> None:
        """They stay out of the process; importing one of them later still works."""
        later = [n for n in ("rich", "greenlet") if importlib.util.find_spec(n) is not None]
        script = (
            "import sys\n"
            "from bots.runtime.imports import import_structlog\n"
            "import_structlog()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'greenlet')))\n"
            "import structlog\n"
            f"for name in {later!r}: __import__(name)\n"
            "print('structlog' in sys.modules)\n"
        )
        assert run_python(script).stdout.split() == ["[]", "True"]

    def test_nothing_happens_when_structlog_is_loaded_already(self) -> None:
        """Imported first by someone else, structlog is left as it is."""
        script = (
            "import sys, structlog\n"
            "loaded = set(sys.modules)\n"
            "from bots.runtime.imports import import_structlog\n"
            "import_structlog()\n"
            "print(sorted(set(sys.modules) - loaded - {'bots', 'bots.runtime',"
            " 'bots.runtime.imports'}))\n"
        )
        assert run_python(script).stdout.split() == ["[]"]


class TestReadSpec:
    def test_every_field_comes_through(self) -> None:
        """What the manager writes is what the runtime reads, field by field."""
        spec = RuntimeSpec(
            bot_id="greeter",
            instance=2,
            entry="bots.chatbot:main",
            bus=BusSettings(
                redis_url="redis://greeter:s3cret@127.0.0.1:6379/0",
                namespace="ns",
                partitions={"user": 4},
                consumer=ConsumerSettings(concurrency=3, retry=RetrySettings(max_attempts=7)),
            ),
            status_fd=5,
            lease_ttl=2.5,
            log_level="debug",
            log_json=False,
            manager_pid=42,
            subscriptions=[("user.#", {"lang": {"in": ["en"]}})],
        )
        plain = read_spec(spec_json(spec))
        assert isinstance(plain.bus, PlainBusSettings)
        assert plain.subscriptions == (("user.#", {"lang": {"in": ["en"]}}),)
        assert orjson.loads(orjson.dumps(dataclasses.asdict(plain))) == spec.model_dump(mode="json")

    def test_same_fields_and_defaults_as_the_validated_spec(self) -> None:
        """A spec of required fields only reads back as the plain spec's defaults."""
        spec = RuntimeSpec(bot_id="b", instance=0, entry="m:main", bus=BusSettings())
        names = {field.name for field in dataclasses.fields(PlainRuntimeSpec)}
        assert names == set(RuntimeSpec.model_fields)
        expected = PlainRuntimeSpec(bot_id="b", instance=0, entry="m:main", bus=PlainBusSettings())
        assert read_spec(spec_json(spec)) == expected

    @pytest.mark.parametrize(
        "line",
        [
            b"",
            b"not json",
            b"[1, 2]",
            b'{"instance": 0, "entry": "m:main", "bus": {}}',
            b'{"bot_id": "b", "instance": 0, "entry": "m:main", "bus": {}, "colour": 1}',
            b'{"bot_id": "b", "instance": 0, "entry": "m:main", "bus": {"colour": 1}}',
            b'{"bot_id": "b", "instance": 0, "entry": "m:main", "bus": {"consumer": {"x": 1}}}',
        ],
        ids=["empty", "not-json", "not-an-object", "missing", "unknown", "bus", "consumer"],
    )
    def test_anything_else_is_a_spec_error(self, line: bytes) -> None:
        """A line the manager did not write is refused, never half read."""
        with pytest.raises(SpecError):
            read_spec(line)

    def test_repr_leaves_out_credentials(self) -> None:
        """The plain spec's repr names the bot, never its Redis password."""
        bus = PlainBusSettings(redis_url="redis://greeter:s3cret@127.0.0.1:6379/0")
        plain = PlainRuntimeSpec(bot_id="greeter", instance=1, entry="m:main", bus=bus)
        assert "s3cret" not in repr(plain)
        assert "s3cret" not in repr(bus)
        assert repr(plain) == "<PlainRuntimeSpec greeter[1] entry=m:main>"

    def test_a_bad_spec_exits_with_the_config_code(self) -> None:
        """The runtime given something else on stdin says so and exits EXIT_CONFIG."""
        done = subprocess.run(
            [sys.executable, "-m", "bots.runtime"], input=b"nonsense\n", cwd=ROOT,
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == EXIT_CONFIG
        assert b"bad spec on stdin (start bots with multibot)" in done.stderr
