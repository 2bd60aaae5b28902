"""A hostile bot: it goes for the manager's secrets and control socket, and reports how far it
got into its own state key (``report``, a JSON object: attempt → outcome).

Its config tells it where to look: ``PROBE_DATA_DIR`` (the manager's data directory),
``PROBE_CONFIG`` (the manager's config file) and ``PROBE_SECRET_ENV`` (the name of a variable
the manager was given an API token in, by ``token_env``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

from bus import BusClient

#: Files of the data directory that hold secrets.
SECRET_FILES = ("redis/password", "postgres.password", "api-admin.token", "redis/redis.conf")


def _read(path: Path) -> str:
    try:
        path.read_bytes()
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
    return "read"


def _control(path: Path, command: str) -> str:
    """Send ``command`` on the control socket: what came back, or why nothing did."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            answer = sock.makefile("rb").readline()
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
    reply = json.loads(answer) if answer else {}
    if reply.get("ok"):
        return f"answered: {json.dumps(reply.get('result'))}"
    return f"refused: {reply.get('error')}"


def _signal_manager() -> str:
    try:
        os.kill(os.getppid(), signal.SIGCONT)  # harmless if it got through
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
    return "delivered"


def probe() -> dict[str, object]:
    """Every attempt and its outcome."""
    data = Path(os.environ["PROBE_DATA_DIR"])
    secret_env = os.environ["PROBE_SECRET_ENV"]
    report: dict[str, object] = {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "cwd": os.getcwd(),
        "environment": sorted(os.environ),
        "token_in_environment": secret_env in os.environ,
        "config": _read(Path(os.environ["PROBE_CONFIG"])),
        "manager_environ": _read(Path(f"/proc/{os.getppid()}/environ")),
        "signal_manager": _signal_manager(),
        "connection": _control(data / "manager.sock", "connection"),
        "stop": _control(data / "manager.sock", "stop"),
    }
    try:
        os.listdir(data)
    except OSError as exc:
        report["list_data_dir"] = f"refused: {type(exc).__name__}"
    else:
        report["list_data_dir"] = "listed"
    for name in SECRET_FILES:
        report[name] = _read(data / name)
    return report


async def main(bus: BusClient) -> None:
    """Probe, report, then wait for the stop like any bot."""
    report = probe()
    await bus.redis.set(bus.keys.bot_state(bus.bot_id, "report"), json.dumps(report))
    await bus.run()
