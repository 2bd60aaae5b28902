"""A hostile bot: it tries, through each of its Redis users, every thing a bot may not do.

It reads as the boundary's documentation: each attempt below is one "may not" of the
README's Security section. The bot publishes one ``test.probe.report`` event naming each
attempt's outcome: ``refused`` (Redis said no for lack of permission, to every user: its own
keys', its group's and its replays'), ``succeeded`` (through any), or ``failed: …`` (it
failed for another reason, which proves nothing). The test decides what
each outcome means. Destructive attempts aim at the ``probe`` stream only (the test's
config routes ``probe.*`` there), so a hole found does not take the test's fleet down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from bus import BusClient
from bus.keys import ARCHIVER_GROUP, group_name

#: The highest entry id Redis accepts: after it, nothing can be added to the stream.
LAST_ID = "18446744073709551615-18446744073709551615"
#: Another bot of the fleet whose group and state the probe reaches for.
VICTIM = "victim"


def _attempts(bus: BusClient) -> dict[str, Callable[[Redis], Awaitable[Any]]]:
    """Attempt name → what it does with the bot's own connection."""
    keys = bus.keys
    probe, shared = keys.stream("probe"), keys.stream("bot")
    victim_inbox = keys.inbox(group_name(VICTIM), shared)

    def run(*args: Any) -> Callable[[Redis], Awaitable[Any]]:
        return lambda r: r.execute_command(*args)  # type: ignore[no-untyped-call]

    return {
        # -- streams: no deleting, trimming, expiring, overwriting or choosing entry ids --
        "delete a stream": run("DEL", probe),
        "unlink a stream": run("UNLINK", probe),
        "expire a stream": run("PEXPIRE", probe, 1),
        "overwrite a stream": run("SET", keys.stream("fresh"), "x"),
        "trim a stream (XTRIM)": run("XTRIM", probe, "MAXLEN", 0),
        "trim a stream (XADD MAXLEN)": run("XADD", probe, "MAXLEN", 0, "*", "type", "x.y"),
        "delete an entry": run("XDEL", probe, "0-1"),
        "exhaust a stream's ids": run("XADD", probe, LAST_ID, "type", "x.y"),
        "move a stream's last id": run("XSETID", probe, LAST_ID),
        # -- publishing: only through its own outbox, which the manager relays -------------
        "write a stream directly": run(
            "XADD", keys.stream("direct"), "*", "type", "probe.x", "source", "manager"
        ),
        "write another bot's outbox": run("XADD", keys.outbox(VICTIM), "*", "type", "probe.x"),
        "write the dead letters": run("XADD", keys.dead_letters(), "*", "reason", "forged"),
        # -- groups: only its own, and never created, moved or destroyed by the bot -------
        "read through the archiver's group": run(
            "XREADGROUP", "GROUP", ARCHIVER_GROUP, "probe", "STREAMS", shared, ">"
        ),
        "ack through the archiver's group": run("XACK", shared, ARCHIVER_GROUP, "0-1"),
        "read through another bot's group": run(
            "XREADGROUP", "GROUP", group_name(VICTIM), "probe", "STREAMS", shared, ">"
        ),
        "read through another bot's group in its inbox": run(
            "XREADGROUP", "GROUP", group_name(VICTIM), "probe", "STREAMS", victim_inbox, ">"
        ),
        "ack in another bot's inbox": run("XACK", victim_inbox, group_name(VICTIM), "0-1"),
        "read another bot's inbox": run("XRANGE", victim_inbox, "-", "+"),
        "create a group": run("XGROUP", "CREATE", shared, "bot-group-evil", "$"),
        "move a group": run("XGROUP", "SETID", shared, group_name(VICTIM), "$"),
        "destroy a group": run("XGROUP", "DESTROY", shared, group_name(VICTIM)),
        # -- other keys, databases, scripts and clients ------------------------------------
        "read another bot's state": run("GET", keys.bot_state(VICTIM, "secret")),
        "read the dead letters": run("XRANGE", keys.dead_letters(), "-", "+"),
        "lower the backpressure flag": run("DEL", keys.pressure()),
        "switch database": run("SELECT", 1),
        "run an arbitrary script": run("EVAL", "return 1", 0),
        "load a function": run(
            "FUNCTION", "LOAD", "#!lua name=probe\nredis.register_function('p', function() end)"
        ),
        "wake another client": run("CLIENT", "UNBLOCK", 1),
        "list clients": run("CLIENT", "LIST"),
        "kill a client": run("CLIENT", "KILL", "ID", 1),
        "flush everything": run("FLUSHALL"),
        "reconfigure Redis": run("CONFIG", "SET", "maxmemory", "1"),
        "change its own permissions": run("ACL", "SETUSER", "default", "off"),
        "list key names": run("SCAN", 0),
    }


async def _outcome(act: Callable[[Redis], Awaitable[Any]], users: list[Redis]) -> str:
    """``succeeded`` if any user could, else the first user's refusal or failure."""
    outcomes = [await _try(act(user)) for user in users]
    return "succeeded" if "succeeded" in outcomes else outcomes[0]


async def _try(attempt: Awaitable[Any]) -> str:
    try:
        await attempt
    except NoPermissionError:
        return "refused"
    except ResponseError as exc:
        if "NOPERM" in str(exc) or "no permissions" in str(exc):
            return "refused"
        return f"failed: {exc}"
    return "succeeded"


async def main(bus: BusClient) -> None:
    """Try every attempt, publish the outcomes, then publish under a forged source."""
    users = [bus.redis, bus.streams, bus.replays]
    assert len({id(u) for u in users}) == 3  # the manager gave the bot three users
    outcomes = {name: await _outcome(act, users) for name, act in _attempts(bus).items()}
    # The test checks what consumers see as the source of this one (sent through the outbox).
    await bus.publish_many([bus.event("test.probe.forged", {}, source="manager")])
    await bus.publish("test.probe.report", outcomes)
    await asyncio.Event().wait()  # until the manager stops it
