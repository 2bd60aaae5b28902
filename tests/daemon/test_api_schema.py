"""Schemathesis against the running manager's own OpenAPI document: generated requests,
valid and not, to every operation; no server error and no answer outside the document."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import bot_toml

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.one_redis, pytest.mark.slow]

#: What "no server errors and no schema violations" means, as schemathesis checks.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


async def test_generated_requests_get_no_5xx_and_fit_the_document(
    manager_factory: ManagerFactory, tmp_path: Path
) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    if not schemathesis.exists() and not shutil.which("schemathesis"):
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    manager = await manager_factory(bot_toml("steady", "tests.daemon.sample_bots:steady"))
    url, admin = await manager.api()
    process = await asyncio.create_subprocess_exec(
        str(schemathesis), "run", f"{url}/openapi.json",
        "--header", f"Authorization: Bearer {admin}",
        "--checks", ",".join(CHECKS),
        "--max-examples", "30",
        "--seed", "1",
        # One worker: on CPython before 3.11.8 the ast module's recursion counter is shared
        # between threads, and two workers parsing sources at once (hypothesis does) fail
        # with "SystemError: AST constructor recursion depth mismatch" (gh-106905).
        "--workers", "1",
        "--request-timeout", "10",
        "--report", "junit", "--report-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its .schemathesis/ cache goes there
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 240)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "Traceback" not in manager.log()
