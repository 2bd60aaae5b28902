"""The relay pumps the fanout: a bot's event reaches the subscribed inboxes in the relay's own
script, one hop from the outbox, and the inboxes still get each stream's entries in the
stream's order, whoever else writes there (not on a cluster, where the two stay apart)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bus.fanout import Fanout
from bus.keys import FANOUT_CONSUMER, FANOUT_GROUP, Keys
from bus.lease import run_script
from bus.outbox import OutboxRelay
from bus.relay_script import RELAY
from bus.routing import Router
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.deployments, pytest.mark.no_cluster]

KEYS = Keys()
ROUTER = Router({"user": "user", "bot": "bot"}, "bot")
USER, BOT = KEYS.stream("user"), KEYS.stream("bot")
A = "bot-group-a"


@pytest.fixture
async def fanout(redis: Redis) -> Fanout:
    """The fanout of both streams, group A subscribed to ``user``; never run on its own."""
    fanout = Fanout(redis, KEYS, lambda: [USER, BOT], block=0.1)
    await fanout.subscribe(USER, A)
    return fanout


def relay_of(redis: Redis, fanout: Fanout) -> OutboxRelay:
    return OutboxRelay(redis, KEYS, ROUTER, lambda: ["alice"], block=0.1, fanout=fanout)


@pytest.fixture
async def running(redis: Redis, fanout: Fanout) -> AsyncIterator[OutboxRelay]:
    """The relay of bot "alice" pumping ``fanout``, running in the background alone."""
    relay = relay_of(redis, fanout)
    assert relay.drives_fanout
    task = asyncio.create_task(relay.run())
    yield relay
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def ids(redis: Redis, key: str) -> list[str]:
    rows: Any = await redis.xrange(key)
    return [str(entry_id) for entry_id, _ in rows]


async def outbox(redis: Redis, type_: str, n: int = 1) -> None:
    for i in range(n):
        await redis.xadd(KEYS.outbox("alice"), {"type": type_, "n": str(i)})


class TestOneHop:
    async def test_a_relayed_event_is_in_the_inbox_when_the_relay_script_returns(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        relay = relay_of(redis, fanout)
        await outbox(redis, "user.login.done", 3)
        assert await relay.drain("alice") == 3
        relayed = await ids(redis, USER)
        assert len(relayed) == 3
        assert await ids(redis, KEYS.inbox(A, USER)) == relayed  # no fanout ran
        assert fanout.copied == 3
        assert fanout.positions()[USER] == relayed[-1]
        groups: Any = await redis.xinfo_groups(USER)
        assert [(g["name"], g["pending"]) for g in groups] == [(FANOUT_GROUP, 0)]

    async def test_other_writers_entries_go_first_in_stream_order(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """Entries an admin wrote straight to the stream are pumped with the relayed ones,
        so the inbox never gets a later id before an earlier one."""
        relay = relay_of(redis, fanout)
        direct = [str(await redis.xadd(USER, {"type": "user.x", "n": str(i)})) for i in range(2)]
        await outbox(redis, "user.login.done")
        await relay.drain("alice")
        stream = await ids(redis, USER)
        assert stream[:2] == direct
        assert await ids(redis, KEYS.inbox(A, USER)) == stream

    async def test_an_entry_left_pending_by_a_stopped_pump_is_copied_first(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """A pump stopped before its ack (Redis out of memory) leaves the entry pending in
        the fanout group; the relay's pump takes it before anything newer."""
        relay = relay_of(redis, fanout)
        stuck = str(await redis.xadd(USER, {"type": "user.x"}))
        await redis.xreadgroup(FANOUT_GROUP, FANOUT_CONSUMER, {USER: ">"})  # read, not acked
        await outbox(redis, "user.login.done")
        await relay.drain("alice")
        inbox = await ids(redis, KEYS.inbox(A, USER))
        assert inbox[0] == stuck
        assert inbox == await ids(redis, USER)
        pending: Any = await redis.xpending(USER, FANOUT_GROUP)
        assert pending["pending"] == 0

    async def test_a_stream_the_fanout_has_not_prepared_is_relayed_and_left_to_it(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """No fanout group on the stream yet (a route added by a reload): the events are
        appended and leave the outbox; the fanout's preparing copies them later."""
        relay = relay_of(redis, fanout)
        await outbox(redis, "bot.note.made", 2)
        assert await relay.drain("alice") == 2
        assert len(await ids(redis, BOT)) == 2
        assert await redis.xlen(KEYS.outbox("alice")) == 0
        assert fanout.copied == 0

    async def test_a_relay_reply_never_received_leaves_no_stale_position(
        self, redis: Redis, fanout: Fanout
    ) -> None:
        """The relay's script ran but its reply was lost (a connection cut, a cancel): the
        fanout's position is behind the group's. Its next pump reads nothing and catches
        up, instead of waking for those entries again and again."""
        relay = relay_of(redis, fanout)
        await outbox(redis, "user.login.done", 2)
        before = fanout.positions()[USER]
        await run_script(redis, RELAY, *relay.script_call("alice"))  # not through the relay
        relayed = await ids(redis, USER)
        assert await ids(redis, KEYS.inbox(A, USER)) == relayed
        assert fanout.positions()[USER] == before
        assert fanout.ahead(USER, relayed[0])
        assert await fanout.pump(USER) == 0
        assert fanout.positions()[USER] == relayed[-1]
        assert not fanout.ahead(USER, relayed[-1])


class TestRunning:
    async def test_entries_written_to_the_stream_directly_reach_the_inbox(
        self, redis: Redis, running: OutboxRelay, fanout: Fanout
    ) -> None:
        """The relay's loop waits on the streams too: what the API or an admin publishes
        straight to a stream is pumped without a fanout loop of its own."""
        direct = str(await redis.xadd(USER, {"type": "user.x"}))
        inbox = KEYS.inbox(A, USER)
        await wait_until(lambda: _has(redis, inbox, 1), what="the direct entry pumped")
        await outbox(redis, "user.login.done")
        await wait_until(lambda: _has(redis, inbox, 2), what="the relayed entry pumped")
        assert (await ids(redis, inbox))[0] == direct
        assert await ids(redis, inbox) == await ids(redis, USER)

    async def test_a_group_moved_back_is_pumped_again_once_all_is_quiet(
        self, redis: Redis, running: OutboxRelay, fanout: Fanout
    ) -> None:
        """A restore moved the fanout group back (XGROUP SETID) while the relay held a
        later position, and nothing is written after: the relay's first quiet wait reads
        the group's position again and pumps what lies beyond it."""
        direct = [str(await redis.xadd(USER, {"type": "user.x", "n": str(i)})) for i in range(5)]
        await wait_until(lambda: _delivered(redis, direct[-1]), what="all five pumped")
        await redis.xgroup_setid(USER, FANOUT_GROUP, direct[1])
        await wait_until(lambda: _delivered(redis, direct[-1]), what="pumped again")
        assert await ids(redis, KEYS.inbox(A, USER)) == direct

    @pytest.mark.parametrize("fresh", [False, True], ids=["prepared", "fresh"])
    async def test_a_routed_stream_overwritten_stops_only_its_pumping(
        self, redis: Redis, fanout: Fanout, fresh: bool
    ) -> None:
        """An admin overwrote a routed stream with a string: it is set aside with an error
        saying what to do, and the other stream's events still flow, relayed and pumped;
        also for a fanout that has to prepare every stream (a manager just started)."""
        await fanout.subscribe(BOT, A)
        await redis.delete(USER)
        await redis.set(USER, "not a stream")
        if fresh:
            fanout = Fanout(redis, KEYS, lambda: [USER, BOT], block=0.1)
        relay = relay_of(redis, fanout)
        with capture_logs() as logs:
            task = asyncio.create_task(relay.run())
            try:
                await outbox(redis, "bot.note.made", 2)
                inbox = KEYS.inbox(A, BOT)
                await wait_until(lambda: _has(redis, inbox, 2), what="the bot stream pumped")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        errors = [e for e in logs if e["log_level"] == "error"]
        assert any(f"redis-cli DEL {USER}" in e["event"] for e in errors), errors
        assert await redis.get(USER) == "not a stream"


async def _has(redis: Redis, key: str, n: int) -> bool:
    return bool(await redis.exists(key)) and int(await redis.xlen(key)) == n


async def _delivered(redis: Redis, entry_id: str) -> bool:
    """Whether the fanout group's last delivered entry is ``entry_id``."""
    groups: Any = await redis.xinfo_groups(USER)
    return any(g["name"] == FANOUT_GROUP and g["last-delivered-id"] == entry_id for g in groups)
