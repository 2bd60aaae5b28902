"""The bare worker ``multibot bench-manager`` weighs next to an idle bot: redis-py's asyncio
client on uvloop, connected and blocked on ``XREADGROUP``, as an idle bot's consumer is.

``python -m manager.bench.bare_worker STREAM GROUP``, with the Redis URL as the first line
of stdin (it carries a password, which argv would show to every user); the group must
exist. It writes ``ready`` on stdout once connected, then reads until it is killed.

It imports nothing but those two packages and the standard library: what a bot process
cannot weigh less than. A test keeps it so.
"""

from __future__ import annotations

import sys

import uvloop
from redis.asyncio import Redis

#: As a bot's consumer reads by default (``bus.settings.ConsumerSettings``).
READ_COUNT = 200
BLOCK_MS = 2000


async def work(url: str, stream: str, group: str) -> None:
    """Connect, say ``ready`` on stdout, then read ``group`` on ``stream`` until cancelled."""
    client = Redis.from_url(url, decode_responses=True, client_name="multibot-bench-bare")
    try:
        await client.ping()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while True:
            await client.xreadgroup(group, "bare-0", {stream: ">"}, READ_COUNT, BLOCK_MS)
    finally:
        await client.aclose()


def main() -> None:
    """Entry point: the URL from stdin, the stream and the group from argv."""
    url = sys.stdin.readline().strip()
    stream, group = sys.argv[1:3]
    uvloop.run(work(url, stream, group))


if __name__ == "__main__":
    main()
