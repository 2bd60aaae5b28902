"""``python -m manager.bench.http_load``: load ``POST /v1/events`` and print one JSON line.

The load generator of ``multibot bench-api``, run as a process of its own so that its CPU
is not the manager's. Each of ``--concurrency`` workers holds one HTTP/1.1 keep-alive
connection and sends the same request back to back: one event (``--batch 1``, a JSON
object) or an array of ``--batch`` events. A minimal client on asyncio streams (uvloop)
rather than an HTTP library: it writes the request with a Content-Length, reads the status
line, the headers and a Content-Length body, and nothing else, so the measurement is of the
server. Requests completing in the first ``--warmup`` seconds are not counted; those
completing in the next ``--duration`` seconds are.

The bearer token is read from the first line of ``--token-file`` (``-``, the default: stdin),
never taken from the command line, which every local user can read (``ps``).

Printed: requests and events accepted (202) per second, the latency of a request from the
first byte written to the last byte of its answer (p50/p95/p99/max ms), non-202 answers by
status code (connection failures as ``"connection"``), and the CPU share of this process and,
given ``--pid``, of the server over the window (100% is one core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import uvloop

from manager.bench.load_window import Window

EVENT_TYPE = "bench.api.sent"


class HttpLoadError(Exception):
    """The server answered something this minimal client does not read (no Content-Length)."""


def request_bytes(host: str, port: int, token: str, batch: int) -> bytes:
    """The whole request, head and body: one event object, or an array of ``batch``."""
    events = [{"type": EVENT_TYPE, "data": {"n": n, "bench": "api"}} for n in range(batch)]
    body = json.dumps(events[0] if batch == 1 else events, separators=(",", ":")).encode()
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader) -> tuple[str, bool]:
    """Read one response; its status code and whether the server keeps the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)[1]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise HttpLoadError(f"a {status} answer without Content-Length: {head[:200]!r}")
    await reader.readexactly(int(headers["content-length"]))
    return status, headers.get("connection", "").lower() != "close"


async def _worker(host: str, port: int, request: bytes, window: Window) -> None:
    """Send ``request`` back to back on one connection until the window closes."""
    clock = time.perf_counter
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while clock() < window.end:
            if stream is None:
                try:
                    stream = await asyncio.open_connection(host, port)
                except OSError:
                    window.note(clock(), clock(), "connection")
                    await asyncio.sleep(0.1)  # a refused connect would otherwise spin
                    continue
            reader, writer = stream
            sent = clock()
            try:
                writer.write(request)
                status, keep = await _answer(reader)
            except (OSError, asyncio.IncompleteReadError):
                window.note(sent, clock(), "connection")
                keep = False
            else:
                window.note(sent, clock(), status)
            if not keep:
                writer.close()
                stream = None
    finally:
        if stream is not None:
            stream[1].close()


async def run_load(
    url: str,
    token: str,
    *,
    batch: int,
    concurrency: int,
    duration: float,
    warmup: float,
    pid: int | None = None,
) -> dict[str, Any]:
    """Load ``url``'s ``POST /v1/events``; the results as a JSON-able dict (with the CPU
    share of the server process ``pid`` over the window, if given)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = request_bytes(host, port, token, batch)
    window = Window.after(warmup, duration)
    server = psutil.Process(pid) if pid is not None else None
    async with asyncio.TaskGroup() as group:
        group.create_task(window.clock_cpu(server))
        for _ in range(concurrency):
            group.create_task(_worker(host, port, request, window))
    return {
        **window.summary(batch=batch, concurrency=concurrency, warmup=warmup),
        "request_bytes": len(request),
    }


def _first_line(path: Path | None) -> str:
    """The first line of ``path`` (of stdin if None), stripped."""
    if path is None:
        return sys.stdin.readline().strip()
    with path.open() as file:
        return file.readline().strip()


def main(argv: list[str] | None = None) -> None:
    """The command line: load, then print the results as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m manager.bench.http_load", description=__doc__)
    parser.add_argument("--url", required=True, help="the API's base URL, http://host:port")
    parser.add_argument(
        "--token-file",
        default="-",
        metavar="FILE",
        help="the bearer token (publish scope) is its first line; - (the default): stdin",
    )
    parser.add_argument("--batch", type=int, default=1, help="events per request (1: an object)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections, one per worker")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--pid", type=int, help="the server's pid, to report its CPU share")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.concurrency < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--batch and --concurrency must be >= 1, --duration > 0, --warmup >= 0")
    source = "stdin" if args.token_file == "-" else args.token_file
    try:
        token = _first_line(None if args.token_file == "-" else Path(args.token_file))
    except OSError as exc:
        parser.error(f"cannot read the token from {source}: {exc}")
    if not token:
        parser.error(f"no token on the first line of {source}")
    result = uvloop.run(
        run_load(
            args.url,
            token,
            batch=args.batch,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            pid=args.pid,
        )
    )
    print(json.dumps(result), flush=True)  # noqa: T201 - the output is this line


if __name__ == "__main__":
    main()
