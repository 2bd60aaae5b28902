"""Tests for manager.daemon.redis_acl: a bot's ACL user runs the whole bus and nothing more."""

from __future__ import annotations

import asyncio
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlsplit

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bus import BusClient, Event
from bus.dlq import DeadLetters
from bus.fanout import Fanout
from bus.keys import ARCHIVER_GROUP, Keys, consumer_name, group_name
from bus.lease import SCRIPTS, Lease, run_script, script_sha
from bus.outbox import OutboxRelay
from bus.routing import DEFAULT_ROUTES, DEFAULT_STREAM, Router
from bus.settings import BusSettings, RetrySettings
from manager.daemon.redis_acl import (
    BotUserError,
    RedisAclError,
    bot_acl_rules,
    bot_id_of,
    bot_key_patterns,
    bot_redis_url,
    bot_state_patterns,
    bot_username,
    bot_users,
    bots_base_url,
    delete_bot_user,
    ensure_bot_user,
    generate_password,
    replay_acl_rules,
    replay_username,
    streams_acl_rules,
    streams_username,
)
from manager.embedded.redis_server import RedisBinary
from manager.errors import ManagerError
from tests.conftest import RedisFactory
from tests.support import running, wait_until

pytestmark = pytest.mark.redis

KEYS = Keys()
BOT = "greeter"
#: Streams the tests' bots read; the manager creates their groups before a bot starts.
READ_STREAMS = ("user", "system")
#: Handshake commands redis-py sends on connect and ignores the failure of: CLIENT SETINFO
#: (library name) and, over RESP3 on TCP, CLIENT MAINT_NOTIFICATIONS. 7.0 knows neither, so
#: the rules cannot name them; 6.2 takes any subcommand name but refuses these by ACL and
#: logs them as "client" (so on 6.2 this also hides other CLIENT refusals; the tests of
#: CLIENT ID/UNBLOCK check those directly).
OPTIONAL_HANDSHAKE = {"client|setinfo", "client|maint_notifications", "client"}


class BotBus(Protocol):
    """Makes a connected BusClient that logs in as the bot's own ACL user."""

    def __call__(
        self, bot_id: str, *, instance: int | str = 0, **consumer: object
    ) -> Awaitable[BusClient]: ...


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Redis]:
    """A connection with the server's full rights, as the manager holds."""
    async with Redis.from_url(redis_url, decode_responses=True) as client:
        await client.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
        yield client


async def bot_urls(
    admin: Redis, redis_url: str, bot_id: str, keys: Keys = KEYS
) -> tuple[str, str, str]:
    """Create ``bot_id``'s users with a fresh password; return the URLs the bot would get:
    its own keys', its group's (inboxes) and its replays'."""
    password = generate_password()
    username = await ensure_bot_user(admin, keys, bot_id, password)
    streams = streams_username(keys.namespace, bot_id)
    replay = replay_username(keys.namespace, bot_id)
    return (
        bot_redis_url(redis_url, username, password),
        bot_redis_url(redis_url, streams, password),
        bot_redis_url(redis_url, replay, password),
    )


async def bot_url(admin: Redis, redis_url: str, bot_id: str, keys: Keys = KEYS) -> str:
    """The URL of ``bot_id``'s own keys' user (:func:`bot_urls`)."""
    return (await bot_urls(admin, redis_url, bot_id, keys))[0]


@pytest.fixture
async def bot_bus(admin: Redis, redis_url: str) -> AsyncIterator[BotBus]:
    """Bus clients each logged in as its bot's ACL users, with fast test timings, publishing
    through their outboxes and reading their inboxes, a relay and a fanout moving the
    events, as under the manager."""
    clients: list[BusClient] = []
    urls: dict[str, tuple[str, str, str]] = {}
    relay = OutboxRelay(admin, KEYS, Router(DEFAULT_ROUTES, DEFAULT_STREAM), lambda: list(urls))
    fanout = Fanout(admin, KEYS, lambda: [KEYS.stream(name) for name in READ_STREAMS], block=0.1)
    moving = [asyncio.create_task(relay.run()), asyncio.create_task(fanout.run())]

    async def make(bot_id: str, *, instance: int | str = 0, **consumer: object) -> BusClient:
        if bot_id not in urls:
            urls[bot_id] = await bot_urls(admin, redis_url, bot_id)
            for name in READ_STREAMS:  # as the manager does for declared subscriptions
                await fanout.subscribe(KEYS.stream(name), group_name(bot_id), "0")
        timings: dict[str, Any] = {"block_ms": 500, "visibility_timeout": 5.0, "start_id": "0"}
        own, streams, replay = urls[bot_id]
        settings = BusSettings.model_validate(
            {
                "redis_url": own,
                "streams_url": streams,
                "replay_url": replay,
                "inboxes": True,
                "consumer": {**timings, **consumer},
                "outbox": True,
            }
        )
        client = BusClient(bot_id, settings=settings, instance=instance)
        clients.append(client)
        return await client.connect()

    yield make
    for client in clients:
        await client.close()
    for task in moving:
        task.cancel()
    await asyncio.gather(*moving, return_exceptions=True)


@pytest.fixture
async def bot_logins(admin: Redis, redis_url: str) -> AsyncIterator[tuple[Redis, Redis, Redis]]:
    """Plain connections logged in as BOT's three ACL users: its own keys', its group's,
    its replays'."""
    own, streams, replay = await bot_urls(admin, redis_url, BOT)
    async with (
        Redis.from_url(own, decode_responses=True) as mine,
        Redis.from_url(streams, decode_responses=True) as reader,
        Redis.from_url(replay, decode_responses=True) as history,
    ):
        yield mine, reader, history


@pytest.fixture
def bot_redis(bot_logins: tuple[Redis, Redis, Redis]) -> Redis:
    """A plain connection logged in as BOT's own keys' user."""
    return bot_logins[0]


@pytest.fixture
def bot_streams(bot_logins: tuple[Redis, Redis, Redis]) -> Redis:
    """A plain connection logged in as BOT's group's user (its inboxes)."""
    return bot_logins[1]


@pytest.fixture
def bot_replay(bot_logins: tuple[Redis, Redis, Redis]) -> Redis:
    """A plain connection logged in as BOT's replay user."""
    return bot_logins[2]


async def denials(admin: Redis) -> list[dict[str, Any]]:
    """ACL LOG entries (refused commands and keys), without redis-py's optional handshake."""
    log: Any = await admin.execute_command("ACL", "LOG")  # type: ignore[no-untyped-call]
    rows = [dict(row) for row in log]
    return [r for r in rows if not (r["reason"] == "command" and r["object"] in OPTIONAL_HANDSHAKE)]


async def command_calls(admin: Redis, name: str) -> int:
    """How many times the server ran a command (INFO commandstats; 6.2 counts containers)."""
    stats: Any = await admin.info("commandstats")
    row = stats.get(f"cmdstat_{name}") or stats.get(f"cmdstat_{name.partition('|')[0]}") or {}
    return int(row.get("calls", 0))


async def refused(call: Awaitable[Any]) -> None:
    """Assert Redis refuses ``call`` for lack of permission (command, key or channel)."""
    with pytest.raises(NoPermissionError):
        await call


@pytest.fixture
def selectors(redis_binary: RedisBinary) -> bool:
    """Whether the server takes ACL selectors (7.0+), which split commands by key."""
    return redis_binary.version >= (7, 0, 0)


# -- pure functions ------------------------------------------------------------------------


class TestRules:
    def test_username(self) -> None:
        """The user names join namespace and bot id with ``.bot.``; the stream user's ends
        in ``.streams``, and either gives the bot id back."""
        assert bot_username("multibot", "greeter") == "multibot.bot.greeter"
        assert bot_username("team-a.prod", "x_1") == "team-a.prod.bot.x_1"
        assert streams_username("multibot", "greeter") == "multibot.bot.greeter.streams"
        assert replay_username("multibot", "greeter") == "multibot.bot.greeter.replay"
        assert bot_id_of("multibot", "multibot.bot.greeter.replay") == "greeter"
        assert bot_id_of("multibot", "multibot.bot.greeter.streams") == "greeter"
        assert bot_id_of("multibot", "multibot.bot.greeter") == "greeter"
        assert bot_id_of("multibot", "multibot.bot.a.b") is None
        assert bot_id_of("multibot", "other.bot.greeter") is None

    @pytest.mark.parametrize("bot_id", ["*", "a*", "a?", "a[b]", "a\\b", "a.b", "", "a b", "a\n"])
    def test_refuses_bot_ids_that_widen_patterns(self, bot_id: str) -> None:
        """A bot id with glob characters, a dot or whitespace cannot get a user."""
        with pytest.raises(BotUserError, match="bot id") as info:
            bot_acl_rules(KEYS, bot_id)
        assert isinstance(info.value, ManagerError) and isinstance(info.value, ValueError)
        with pytest.raises(BotUserError):
            bot_username("multibot", bot_id)
        with pytest.raises(BotUserError):
            streams_username("multibot", bot_id)
        with pytest.raises(BotUserError):
            streams_acl_rules(KEYS, bot_id)

    @pytest.mark.parametrize("namespace", ["*", "m*", "m?", "m[x]", "", "m:x"])
    def test_refuses_namespaces_that_widen_patterns(self, namespace: str) -> None:
        """A namespace with glob characters (or a ':') cannot get users."""
        with pytest.raises(BotUserError, match="namespace"):
            bot_acl_rules(Keys(namespace), BOT)

    def test_key_patterns_are_exactly_the_bots_keys(self) -> None:
        """Its own markers, state, lease, fence, partition leases, membership set and
        outbox, the streams and the backpressure flag; nothing else (not the dead
        letters)."""
        assert bot_key_patterns(KEYS, BOT) == [
            "multibot:idem:bot-group-greeter:*",
            "multibot:bot:greeter:*",
            "multibot:lease:{greeter}",
            "multibot:lease:{greeter}:fence",
            "multibot:lease:{greeter}:part:*",
            "multibot:members:{greeter}",
            "multibot:outbox:{greeter}",
            "multibot:inbox:bot-group-greeter:*",
            "multibot:pressure",
            "multibot:stream:*",
        ]

    def test_rules_reset_then_allow_list(self) -> None:
        """Both users' rules start with reset, deny channels and all commands, then add
        back exactly; only the own-keys user runs scripts."""
        for rules in (
            bot_acl_rules(KEYS, BOT),
            streams_acl_rules(KEYS, BOT),
            replay_acl_rules(KEYS),
        ):
            assert rules[:4] == ["reset", "on", "resetchannels", "-@all"]
            assert "+select|0" in rules
            forbidden = ("+eval", "+client|unblock", "+client|id", "+xgroup", "+xdel", "+xtrim")
            assert not [
                r for r in rules if r.startswith(forbidden) and not r.startswith("+evalsha")
            ]
            assert not [
                r for r in rules if r.startswith(("%", "&", "allkeys", "+@all", ">", "#", "("))
            ]
            assert not {"+@read", "+@write", "+@keyspace", "+@fast", "+@admin"} & set(rules)
        rules = bot_acl_rules(KEYS, BOT)
        assert rules.index("+@string") < rules.index("-@dangerous")
        assert rules.index("-@dangerous") < rules.index("+client|setname")
        assert "+select|3" in bot_acl_rules(KEYS, BOT, db=3)
        assert "+select|3" in streams_acl_rules(KEYS, BOT, db=3)
        assert "+select|3" in replay_acl_rules(KEYS, db=3)
        shas = {f"+evalsha|{script_sha(source)}" for source in SCRIPTS.values()}
        assert shas <= set(rules) and len(shas) == len(SCRIPTS) == 4
        for other in (streams_acl_rules(KEYS, BOT), replay_acl_rules(KEYS)):
            assert not [r for r in other if r.startswith(("+evalsha", "+script"))]

    def test_three_users_split_commands_by_key(self) -> None:
        """The own-keys user: data commands on its own keys, XADD for its outbox, no stream;
        the group's user: a consumer's commands on its inboxes and GET of the flag; the
        replay user: reading the routed streams, no group command. None of the last two
        writes, deletes or expires anything."""
        own = bot_acl_rules(KEYS, BOT)
        assert [r for r in own if r.startswith("~")] == [
            *(f"~{p}" for p in bot_state_patterns(KEYS, BOT)),
            "~multibot:outbox:{greeter}",
        ]
        assert "+xadd" in own and "+xreadgroup" not in own
        streams = streams_acl_rules(KEYS, BOT)
        assert [r for r in streams if r.startswith("~")] == [
            "~multibot:inbox:bot-group-greeter:*",
            "~multibot:pressure",
        ]
        assert "+xreadgroup" in streams and "+get" in streams
        replay = replay_acl_rules(KEYS)
        assert [r for r in replay if r.startswith("~")] == ["~multibot:stream:*"]
        assert "+xrange" in replay
        group_commands = ("+xreadgroup", "+xack", "+xautoclaim", "+xclaim", "+xpending")
        assert not [r for r in replay if r.startswith(group_commands)]
        writes = ("+xadd", "+del", "+unlink", "+set", "+expire", "+pexpire", "+@")
        assert not [r for r in streams + replay if r.startswith(writes)]

    def test_rules_are_pure(self) -> None:
        """The same input gives the same rules; another bot differs only in its own keys,
        and the stream user is the same for every bot."""
        rules = bot_acl_rules(KEYS, BOT)
        assert rules == bot_acl_rules(Keys("multibot"), BOT)
        other = bot_acl_rules(KEYS, "other")

        def shared(rules: list[str]) -> list[str]:
            return [r for r in rules if not r.startswith("~")]

        assert shared(other) == shared(rules)
        assert "~multibot:outbox:{other}" in other
        assert replay_acl_rules(KEYS) == replay_acl_rules(Keys("multibot"))
        assert streams_acl_rules(KEYS, "other") == [
            r.replace("bot-group-greeter", "bot-group-other") for r in streams_acl_rules(KEYS, BOT)
        ]

    def test_generated_passwords(self) -> None:
        """Passwords are URL-safe, at least 43 characters (32 bytes) and never repeat."""
        passwords = {generate_password() for _ in range(50)}
        assert len(passwords) == 50
        allowed = set(string.ascii_letters + string.digits + "-_")
        assert all(len(p) >= 43 and set(p) <= allowed for p in passwords)


class TestBotRedisUrl:
    SPECIAL = "p@ss:w/rd?#%&= +é\\"

    @pytest.mark.parametrize(
        "admin_url",
        [
            "redis://127.0.0.1:6379/0",
            "redis://admin:secret@127.0.0.1:6379/2",
            "redis://:secret@[::1]:6380/0",
            "rediss://default:s%40cret@redis.example:6380/1?ssl_cert_reqs=required",
            "unix:///tmp/redis.sock?db=3",
            "unix://:secret@/tmp/redis.sock?db=0",
            "unix://admin:secret@/tmp/redis.sock",
        ],
    )
    def test_replaces_credentials_and_keeps_the_rest(self, admin_url: str) -> None:
        """Any user and password are replaced; scheme, host, port, path and options stay."""
        url = bot_redis_url(admin_url, "multibot.bot.greeter", self.SPECIAL)
        parts, before = urlsplit(url), urlsplit(admin_url)
        assert (parts.scheme, parts.path, parts.query) == (before.scheme, before.path, before.query)
        assert parts.netloc.rpartition("@")[2] == before.netloc.rpartition("@")[2]
        assert "secret" not in url
        kwargs: Any = parse_url(url)  # what redis-py will connect with
        assert kwargs["username"] == "multibot.bot.greeter"
        assert kwargs["password"] == self.SPECIAL
        assert kwargs.get("host") == (before.hostname if before.scheme != "unix" else None)
        assert kwargs.get("path") == (before.path if before.scheme == "unix" else None)

    def test_drops_credentials_given_as_query_options(self) -> None:
        """``?password=`` and ``?username=`` (which redis-py also reads) are removed."""
        url = bot_redis_url(
            "unix:///tmp/r.sock?db=1&password=admin&username=root&socket_timeout=5",
            "u",
            "pw",
        )
        assert urlsplit(url).query == "db=1&socket_timeout=5"
        kwargs = parse_url(url)
        assert (kwargs.get("username"), kwargs.get("password"), kwargs.get("db")) == ("u", "pw", 1)

    @pytest.mark.parametrize("admin_url", ["http://x:1/0", "localhost:6379", "/tmp/r.sock"])
    def test_refuses_other_schemes(self, admin_url: str) -> None:
        """Only the URLs the bus reads can be turned into bot URLs."""
        with pytest.raises(BotUserError, match="redis://, rediss://, unix://, redis"):
            bot_redis_url(admin_url, "u", "pw")

    def test_a_sentinel_url_keeps_its_sentinels_service_and_options(self) -> None:
        """The bot logs in to the data nodes as itself; the sentinels, the service, the
        database and the sentinels' own login stay."""
        url = bot_redis_url(
            "redis+sentinel://:admin@s1:26379,s2:26380/main/2?sentinel_password=sp", "u", "pw"
        )
        assert url == "redis+sentinel://u:pw@s1:26379,s2:26380/main/2?sentinel_password=sp"

    def test_refuses_empty_credentials(self) -> None:
        """A bot URL always names a user and a password."""
        with pytest.raises(BotUserError):
            bot_redis_url("redis://h:1/0", "u", "")


class TestBotsBaseUrl:
    MANAGER = (
        "rediss://admin:secret@redis.example:6380/1?ssl_ca_certs=/etc/multibot/ca.crt"
        "&ssl_certfile=/etc/multibot/manager.crt&ssl_keyfile=/etc/multibot/manager.key"
        "&ssl_password=keypass&socket_timeout=5"
    )

    def test_manager_client_certificate_never_reaches_bots(self) -> None:
        """The manager's certificate, key and key password are dropped; the CA, host and
        other options stay, so a bot still verifies the server."""
        with capture_logs() as logs:
            url = bots_base_url(self.MANAGER, None)
        assert "manager" not in url and "keypass" not in url
        parts = urlsplit(url)
        assert parts.netloc == "admin:secret@redis.example:6380"  # bot_redis_url replaces it
        assert parse_qsl(parts.query) == [
            ("ssl_ca_certs", "/etc/multibot/ca.crt"),
            ("socket_timeout", "5"),
        ]
        assert [e["log_level"] for e in logs if "client certificate" in e["event"]] == ["warning"]

    def test_bots_get_their_own_certificate(self) -> None:
        """With the bots' certificate and key configured, the bot URL presents those."""
        cert, key = Path("/etc/multibot/bots.crt"), Path("/etc/multibot/bots.key")
        url = bot_redis_url(bots_base_url(self.MANAGER, (cert, key)), "multibot.bot.a", "pw")
        kwargs: Any = parse_url(url)  # what redis-py will connect with
        assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (str(cert), str(key))
        assert kwargs["ssl_ca_certs"] == "/etc/multibot/ca.crt"
        assert "ssl_password" not in kwargs
        assert (kwargs["username"], kwargs["password"]) == ("multibot.bot.a", "pw")

    def test_url_without_client_certificate_is_unchanged(self) -> None:
        """Plain and CA-only URLs pass as they are, with nothing logged."""
        for admin_url in ("redis://127.0.0.1:6379/0", "rediss://h:1/0?ssl_ca_certs=/ca.crt"):
            with capture_logs() as logs:
                assert bots_base_url(admin_url, None) == admin_url
            assert logs == []


# -- what a bot's user can do ---------------------------------------------------------------


class TestBotCan:
    async def test_publish_subscribe_ack(self, bot_bus: BotBus, admin: Redis) -> None:
        """Another bot publishes, the bot's group gets it, the handler runs, it is acked."""
        consumer, producer = await bot_bus(BOT), await bot_bus("sender")
        got: list[str] = []

        @consumer.subscribe("user.test.*")
        async def handle(event: Event) -> None:
            got.append(event.id)

        async with running(consumer):
            ids = await producer.publish_many([("user.test.ping", {"n": n}) for n in range(3)])
            ids.append(await producer.publish("user.test.ping", {"n": 3}, key="k"))
            await wait_until(lambda: sorted(got) == sorted(ids), what="all four events handled")
            stream = KEYS.stream("user")
            await wait_until(lambda: _no_pending(admin, stream, group_name(BOT)), what="acks")
        assert await denials(admin) == []

    async def test_failing_handler_is_dead_lettered(self, bot_bus: BotBus, admin: Redis) -> None:
        """A handler failing every attempt gets its event into the DLQ; the bot may only
        add to the DLQ (through its outbox), not read the letters of others."""
        consumer = await bot_bus(BOT)

        @consumer.subscribe("user.test.*", retry=RetrySettings(max_attempts=2, jitter=0))
        async def handle(event: Event) -> None:
            raise RuntimeError("boom")

        async with running(consumer):
            event_id = await consumer.publish("user.test.ping", {})
            await wait_until(lambda: _has_dead_letters(admin), what="a dead letter")
            await wait_until(lambda: _no_pending(admin, KEYS.stream("user"), group_name(BOT)))
        letters = DeadLetters(admin, KEYS, consumer.router)
        assert await letters.count() == 1
        (letter,) = await letters.list()
        assert letter.event_id == event_id and letter.error == "RuntimeError: boom"
        assert (await letters.get(letter.id)).group == group_name(BOT)
        assert await denials(admin) == []
        await refused(consumer.dlq.count())
        await refused(consumer.dlq.list())

    async def test_idempotent_handler(self, bot_bus: BotBus, admin: Redis) -> None:
        """Run-once markers are written under the bot's group, and a duplicate is skipped."""
        consumer = await bot_bus(BOT)
        calls: list[str] = []

        @consumer.subscribe("user.test.*", idempotent_ttl=60, name="handle")
        async def handle(event: Event) -> None:
            calls.append(event.id)

        async with running(consumer):
            event = consumer.event("user.test.ping", {})
            await consumer.publish_many([event, event])  # the same event id twice
            await wait_until(lambda: consumer.stats()["counters"].get("skipped_duplicates") == 1)
        assert calls == [event.id]
        marker = KEYS.idempotency(group_name(BOT), "handle", event.id, BOT)
        assert await admin.get(marker) == "done"
        assert await denials(admin) == []

    async def test_reclaims_entries_of_a_dead_consumer(self, bot_bus: BotBus, admin: Redis) -> None:
        """Entries another (dead) instance took are reclaimed, kept while running, acked."""
        dead = await bot_bus(BOT, instance="dead")
        stream = KEYS.stream("user")
        event_id = await dead.publish("user.test.ping", {})
        await wait_until(lambda: _relayed(admin, stream, 1), what="the event relayed")
        inbox = KEYS.inbox(group_name(BOT), stream)
        await wait_until(lambda: _relayed(admin, inbox, 1), what="the event in the inbox")
        taken: Any = await dead.streams.xreadgroup(
            group_name(BOT), consumer_name(BOT, "dead"), {inbox: ">"}
        )
        assert taken[0][1][0][1]["id"] == event_id  # pending on "dead", which never acks
        alive = await bot_bus(BOT, instance=0, visibility_timeout=0.4)
        got: list[str] = []

        @alive.subscribe("user.test.*")
        async def handle(event: Event) -> None:
            await asyncio.sleep(0.6)  # long enough for the reclaimer to XCLAIM it as ours
            got.append(event.id)

        async with running(alive):
            await wait_until(lambda: got == [event_id], what="the reclaimed entry handled")
            await wait_until(lambda: _no_pending(admin, stream, group_name(BOT)))
            assert alive.stats()["counters"]["reclaimed"] >= 1
        assert await command_calls(admin, "xautoclaim") >= 1
        assert await command_calls(admin, "xclaim") >= 1
        assert await command_calls(admin, "xpending") >= 1
        assert await denials(admin) == []

    async def test_replay(self, bot_bus: BotBus, admin: Redis) -> None:
        """The bot replays events of several streams in order."""
        client = await bot_bus(BOT)
        ids = [
            await client.publish("user.test.ping", {"n": 1}),
            await client.publish("system.test.done", {"n": 2}),
            await client.publish("user.test.pong", {"n": 3}),
        ]
        await wait_until(lambda: _relayed(admin, KEYS.stream("user"), 2), what="relayed")
        await wait_until(lambda: _relayed(admin, KEYS.stream("system"), 1), what="relayed")
        replayed = [e.id async for e in client.replay(["user.#", "system.#"])]
        assert replayed == ids
        assert await denials(admin) == []

    async def test_stop_ends_the_blocked_read(
        self, bot_bus: BotBus, admin: Redis, selectors: bool
    ) -> None:
        """Stop ends the reader's blocked XREADGROUP at once, without CLIENT UNBLOCK (which a
        bot may not run: it would wake any client)."""
        client = await bot_bus(BOT, block_ms=5000)

        @client.subscribe("user.test.*")
        async def handle(event: Event) -> None:
            pass

        with capture_logs() as logs:
            task = asyncio.create_task(client.run())
            await client.wait_ready()
            await wait_until(
                lambda: _blocked_readers(admin, 1), what="the reader blocked in XREADGROUP"
            )
            started = time.monotonic()
            await client.stop(timeout=5)
            await task
        assert time.monotonic() - started < 2.0
        if selectors:  # 6.2 counts CLIENT calls as one; there the ACL log shows no attempt
            assert await command_calls(admin, "client|unblock") == 0
        assert await denials(admin) == []
        assert not [e for e in logs if e["log_level"] in ("error", "critical")]
        await wait_until(lambda: _blocked_readers(admin, 0), what="no reader left blocked")

    async def test_own_state_and_lease(self, bot_redis: Redis, admin: Redis) -> None:
        """The bot reads and writes its state, lease and fence, and runs the project's lease
        scripts (by SHA1, loading them when Redis has none, as after a restart)."""
        state, lease, fence = KEYS.bot_state(BOT, "role", 1), KEYS.lease(BOT), KEYS.fence(BOT)
        assert await bot_redis.set(state, "leader") and await bot_redis.get(state) == "leader"
        assert await bot_redis.hset(KEYS.bot_state(BOT, "h"), "f", "v") == 1
        assert await bot_redis.incr(fence) == 1
        assert await bot_redis.set(lease, "0 1", nx=True, px=5000)
        assert await bot_redis.pexpire(lease, 10000)
        assert 0 < await bot_redis.pttl(lease) <= 10000
        await bot_redis.delete(lease)
        await admin.script_flush()
        holder = Lease(bot_redis, KEYS, BOT, "0", ttl=5.0)
        assert await holder.try_acquire() and holder.token == 2
        assert await holder.renew()
        assert not await Lease(bot_redis, KEYS, BOT, "1", ttl=5.0).try_acquire()
        await holder.release()
        assert await bot_redis.get(lease) is None
        async with bot_redis.pipeline(transaction=True) as pipe:
            pipe.set(state, "follower")
            pipe.expire(state, 60)
            assert await pipe.execute() == [True, True]
        assert await bot_redis.delete(state, fence) == 2
        assert await denials(admin) == []

    async def test_database_of_the_url(self, redis_url: str) -> None:
        """The bot's database is the manager's (SELECT on connect); another one is refused."""
        db1_url = redis_url.rpartition("/")[0] + "/1"
        async with Redis.from_url(db1_url, decode_responses=True) as admin_db1:
            url = await bot_url(admin_db1, db1_url, BOT)
            async with Redis.from_url(url, decode_responses=True) as bot:
                assert await bot.set(KEYS.bot_state(BOT, "x"), "1")
                await refused(bot.get("other:x"))
                await refused(bot.select(0))
            assert await admin_db1.get(KEYS.bot_state(BOT, "x")) == "1"
        with pytest.raises(NoPermissionError):
            async with Redis.from_url(url.rpartition("/")[0] + "/2") as elsewhere:
                await elsewhere.ping()  # the connect's SELECT 2 is refused


async def _blocked_readers(admin: Redis, count: int) -> bool:
    """Whether ``count`` clients are blocked in XREADGROUP (the fanout's XREAD aside)."""
    clients: Any = await admin.client_list()
    blocked = [c for c in clients if "b" in c["flags"] and c["cmd"] == "xreadgroup"]
    return len(blocked) == count


async def _no_pending(admin: Redis, stream: str, group: str) -> bool:
    """Nothing pending in the group, in its inbox of ``stream``."""
    summary: Any = await admin.xpending(KEYS.inbox(group, stream), group)
    return int(summary["pending"]) == 0


async def _relayed(admin: Redis, stream: str, count: int) -> bool:
    return int(await admin.xlen(stream)) == count


async def _has_dead_letters(admin: Redis) -> bool:
    return int(await admin.xlen(KEYS.dead_letters())) > 0


# -- what a bot's user cannot do ------------------------------------------------------------


class TestDirectPublishing:
    """``supervisor.bot_outbox = false``: the operator trusts the bots with the streams."""

    def test_rules_add_xadd_on_streams_and_dead_letters(self) -> None:
        """The replay user gains XADD and the dead-letter stream; the own-keys user loses
        the outbox; the group's user never writes."""
        replay = replay_acl_rules(KEYS, outbox=False)
        assert "+xadd" in replay and "~multibot:dlq" in replay
        assert "~multibot:dlq" not in replay_acl_rules(KEYS)
        assert "+xadd" not in streams_acl_rules(KEYS, BOT)
        own = bot_acl_rules(KEYS, BOT, outbox=False)
        assert "+xadd" not in own and "~multibot:outbox:{greeter}" not in own

    async def test_bot_publishes_to_the_stream_itself(self, admin: Redis, redis_url: str) -> None:
        """Its XADD reaches the stream and the dead-letter stream, its source unchecked."""
        await ensure_bot_user(admin, KEYS, BOT, "pw", outbox=False)
        url = bot_redis_url(redis_url, replay_username(KEYS.namespace, BOT), "pw")
        async with Redis.from_url(url) as bot:
            assert await bot.xadd(KEYS.stream("user"), {"source": "manager"})
            assert await bot.xadd(KEYS.dead_letters(), {"reason": "x"})
        assert await admin.xlen(KEYS.stream("user")) == 1


class TestBotCannot:
    @pytest.mark.parametrize(
        "key",
        [
            "other:stream:{user}",  # another namespace's stream
            "other:dlq",
            "other:bot:greeter:x",  # the same bot id in another namespace
            "other:lease:{greeter}",
            "multibot:bot:other:x",  # another bot's state
            "multibot:bot:greeter2:x",  # a bot whose id starts like ours
            "multibot:bot:greeter",  # the bare prefix is no key of ours
            "multibot:idem:bot-group-other:h:1",  # another bot's run-once markers
            "multibot:idem:bot-group-greeter2:h:1",
            "multibot:lease:{other}",  # another bot's lease and fence
            "multibot:lease:{other}:fence",
            "multibot:lease:{greeter2}",
            "multibot:lease:{greeter}:x",
            "multibot:credentials:{greeter}",  # its own password, kept for the managers
            "multibot:lease:{greeter}:host:0",  # where its replicas run: the managers' say
            "multibot:other",  # anything else of the namespace
            "multibotx:stream:{user}",
        ],
    )
    async def test_foreign_keys(
        self, bot_logins: tuple[Redis, Redis, Redis], admin: Redis, key: str
    ) -> None:
        """Keys of other namespaces and other bots are neither read nor written."""
        await admin.set(key, "secret")
        bot_redis = bot_logins[0]
        for user in bot_logins:
            await refused(user.get(key))
            await refused(user.set(key, "x"))
            await refused(user.delete(key))
            await refused(user.exists(key))
        # The project's own scripts are no way around it either.
        with pytest.raises(ResponseError, match=r"(?i)permission|can.t access"):
            await run_script(bot_redis, SCRIPTS["release"], [key], ["secret"])
        assert await admin.get(key) == "secret"

    @pytest.mark.parametrize(
        "command",
        [
            ("MSET", "multibot:bot:greeter:a", "1", "other:a", "1"),
            ("MGET", "multibot:bot:greeter:a", "other:a"),
            ("BITOP", "OR", "other:a", "multibot:bot:greeter:a"),
            ("SINTERSTORE", "other:a", "multibot:bot:greeter:a"),
            ("ZUNIONSTORE", "other:a", "1", "multibot:bot:greeter:a"),
            ("LMOVE", "multibot:bot:greeter:a", "other:a", "LEFT", "LEFT"),
            ("PFMERGE", "other:a", "multibot:bot:greeter:a"),
            ("GEORADIUS", "multibot:bot:greeter:a", "0", "0", "1", "km", "STORE", "other:a"),
            ("XREAD", "STREAMS", "multibot:stream:{user}", "other:stream:{user}", "0", "0"),
            ("WATCH", "multibot:bot:greeter:a", "other:a"),
            ("EVAL", "return 1", "2", "multibot:bot:greeter:a", "other:a"),
        ],
        ids=lambda c: c[0],
    )
    async def test_multi_key_commands(
        self, bot_logins: tuple[Redis, Redis, Redis], command: tuple[str, ...]
    ) -> None:
        """A command naming one own and one foreign key is refused as a whole."""
        for user in bot_logins:
            execute = cast(Callable[..., Awaitable[Any]], user.execute_command)
            await refused(execute(*command))

    async def test_stralgo_on_6_2(self, bot_redis: Redis, redis_binary: RedisBinary) -> None:
        """6.2's STRALGO LCS (in @string) checks the keys it reads."""
        if redis_binary.version >= (7, 0, 0):
            pytest.skip("STRALGO was removed in Redis 7.0 (LCS replaced it)")
        execute = cast(Callable[..., Awaitable[Any]], bot_redis.execute_command)
        await refused(execute("STRALGO", "LCS", "KEYS", "multibot:bot:greeter:a", "other:a"))
        assert await execute("STRALGO", "LCS", "STRINGS", "ab", "b") == "b"

    async def test_foreign_streams(
        self, bot_logins: tuple[Redis, Redis, Redis], admin: Redis
    ) -> None:
        """Another namespace's stream can be neither published to, read nor grouped."""
        stream = "other:stream:{user}"
        await admin.xadd(stream, {"a": "1"})
        for user in bot_logins:
            await refused(user.xadd(stream, {"a": "2"}))
            await refused(user.xrange(stream))
            await refused(user.xgroup_create(stream, group_name(BOT), mkstream=True))
            await refused(user.xreadgroup(group_name(BOT), "c", {stream: ">"}))
        assert await admin.xlen(stream) == 1

    async def test_cannot_break_shared_streams(
        self, bot_logins: tuple[Redis, Redis, Redis], admin: Redis
    ) -> None:
        """Neither user deletes, trims, expires or overwrites a stream, reads the dead
        letters, lowers the flag, or creates, moves and destroys groups, on any version."""
        stream = KEYS.stream("user")
        entry = await admin.xadd(stream, {"a": "1"})
        await admin.xgroup_create(stream, group_name("other"), id="0")
        for user in bot_logins:
            await refused(user.xdel(stream, entry))
            await refused(user.xtrim(stream, maxlen=0))
            await refused(user.xgroup_destroy(stream, group_name("other")))
            await refused(user.xgroup_setid(stream, group_name("other"), "$"))
            await refused(user.xgroup_create(stream, group_name("evil"), id="$"))
            await refused(user.xgroup_create(KEYS.stream("new"), group_name(BOT), mkstream=True))
            await refused(user.xgroup_createconsumer(stream, group_name("other"), "evil"))
            await refused(user.xgroup_delconsumer(stream, group_name("other"), "x"))
            execute = cast(Callable[..., Awaitable[Any]], user.execute_command)
            await refused(execute("XSETID", stream, "9999999999999-0"))
            await refused(user.delete(stream))
            await refused(user.unlink(stream))
            await refused(user.expire(stream, 1))
            await refused(user.persist(stream))
            await refused(user.set(KEYS.stream("fresh"), "x"))
            await refused(user.delete(KEYS.dead_letters()))
            await refused(user.xrange(KEYS.dead_letters()))
            await refused(user.set(KEYS.pressure(), "lowered"))
            await refused(user.delete(KEYS.pressure()))
        assert await bot_logins[1].get(KEYS.pressure()) is None  # the flag: read only
        assert await admin.xlen(stream) == 1
        assert [g["name"] for g in await admin.xinfo_groups(stream)] == [group_name("other")]
        assert await admin.exists(KEYS.stream("new"), KEYS.stream("fresh")) == 0

    async def test_group_commands_reach_only_its_own_inboxes(
        self, bot_logins: tuple[Redis, Redis, Redis], admin: Redis
    ) -> None:
        """No user of the bot reads, acks or claims through the archiver's group on a shared
        stream, or through another bot's group in that bot's inbox; its group user reads
        its own inbox."""
        stream = KEYS.stream("user")
        await admin.xadd(stream, {"a": "1"})
        await admin.xgroup_create(stream, ARCHIVER_GROUP, id="0")
        other = KEYS.inbox(group_name("other"), stream)
        await admin.xgroup_create(other, group_name("other"), id="0", mkstream=True)
        for user in bot_logins:
            await refused(user.xreadgroup(ARCHIVER_GROUP, "c", {stream: ">"}))
            await refused(user.xack(stream, ARCHIVER_GROUP, "0-1"))
            await refused(user.xautoclaim(stream, ARCHIVER_GROUP, "c", 0))
            await refused(user.xreadgroup(group_name("other"), "c", {other: ">"}))
            await refused(user.xrange(other))
        mine = KEYS.inbox(group_name(BOT), stream)
        await admin.xgroup_create(mine, group_name(BOT), id="0", mkstream=True)
        assert not await bot_logins[1].xreadgroup(group_name(BOT), "c", {mine: ">"})
        groups: Any = await admin.xinfo_groups(stream)
        assert [g["pending"] for g in groups] == [0]

    async def test_writes_only_its_outbox(
        self, bot_logins: tuple[Redis, Redis, Redis], admin: Redis
    ) -> None:
        """A bot appends to its own outbox only: not to another bot's, not to the dead
        letters, not to a stream or its own inbox, whichever of its users it tries."""
        bot_redis, bot_streams, bot_replay = bot_logins
        assert await bot_redis.xadd(KEYS.outbox(BOT), {"type": "user.test.ping"})
        own_inbox = KEYS.inbox(group_name(BOT), KEYS.stream("user"))
        for user in bot_logins:
            await refused(user.xadd(own_inbox, {"a": "1"}))
            await refused(user.xadd(KEYS.outbox("other"), {"type": "user.test.ping"}))
            await refused(user.xadd(KEYS.dead_letters(), {"reason": "forged"}))
            await refused(user.xadd(KEYS.stream("user"), {"source": "manager"}))
        for user in (bot_streams, bot_replay):
            await refused(user.xadd(KEYS.outbox(BOT), {"type": "user.test.ping"}))
        assert await admin.exists(KEYS.outbox("other"), KEYS.dead_letters()) == 0
        assert await admin.exists(KEYS.stream("user")) == 0

    async def test_cannot_see_key_names(self, bot_logins: tuple[Redis, Redis, Redis]) -> None:
        """Commands listing or sampling key names across namespaces are refused."""
        for user in bot_logins:
            await refused(user.keys("*"))
            await refused(user.scan(0))
            await refused(user.randomkey())
            await refused(user.dbsize())
            await refused(user.sort(KEYS.bot_state(BOT, "list")))

    async def test_no_pub_sub(self, bot_logins: tuple[Redis, Redis, Redis]) -> None:
        """No channel can be published to or subscribed."""
        for user in bot_logins:
            await refused(user.publish("multibot:events", "x"))
            execute = cast(Callable[..., Awaitable[Any]], user.execute_command)
            await refused(execute("SUBSCRIBE", "multibot:events"))
            await refused(execute("PSUBSCRIBE", "*"))

    @pytest.mark.parametrize(
        "command",
        [
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("CONFIG", "GET", "maxmemory"),
            ("CONFIG", "SET", "maxmemory", "1"),
            ("ACL", "WHOAMI"),
            ("ACL", "LIST"),
            ("ACL", "USERS"),
            ("ACL", "GETUSER", "default"),
            ("ACL", "SETUSER", "multibot.bot.greeter", "+@all"),
            ("ACL", "DELUSER", "default"),
            ("ACL", "LOG"),
            ("KEYS", "*"),
            ("SHUTDOWN", "NOSAVE"),
            ("DEBUG", "SLEEP", "0"),
            ("MONITOR",),
            ("SCRIPT", "FLUSH"),
            ("SCRIPT", "KILL"),
            ("FUNCTION", "LIST"),
            ("FUNCTION", "FLUSH"),
            ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', function() end)"),
            ("FCALL", "f", "0"),
            ("CLIENT", "KILL", "ID", "1"),
            ("CLIENT", "LIST"),
            ("CLIENT", "PAUSE", "1"),
            ("MIGRATE", "127.0.0.1", "1", "multibot:bot:greeter:x", "0", "10"),
            ("SWAPDB", "0", "1"),
            ("MOVE", "multibot:bot:greeter:x", "1"),
            ("COPY", "multibot:bot:greeter:x", "multibot:bot:greeter:y", "DB", "1"),
            ("SAVE",),
            ("BGSAVE",),
            ("BGREWRITEAOF",),
            ("LASTSAVE",),
            ("REPLICAOF", "127.0.0.1", "1"),
            ("SLAVEOF", "NO", "ONE"),
            ("MODULE", "LIST"),
            ("INFO",),
            ("SLOWLOG", "GET"),
            ("LATENCY", "LATEST"),
            ("OBJECT", "ENCODING", "multibot:bot:greeter:x"),
            ("DUMP", "multibot:bot:greeter:x"),
            ("RESTORE", "multibot:bot:greeter:y", "0", "x"),
            ("RENAME", "multibot:bot:greeter:x", "multibot:bot:greeter:y"),
            ("WAIT", "0", "0"),
            ("PUBLISH", "c", "x"),
            ("PFDEBUG", "GETREG", "multibot:bot:greeter:x"),
            ("EVAL", "return 1", "0"),
            ("EVAL_RO", "return 1", "0"),
            ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),  # return 1
            ("SCRIPT", "EXISTS", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"),
            ("SELECT", "1"),
            ("CLIENT", "UNBLOCK", "1"),
            ("CLIENT", "ID"),
            ("XGROUP", "CREATE", "multibot:stream:{user}", "g", "$", "MKSTREAM"),
            ("XGROUP", "SETID", "multibot:stream:{user}", "g", "$"),
        ],
        ids=lambda c: " ".join(c[:2]),
    )
    async def test_admin_commands(
        self,
        bot_logins: tuple[Redis, Redis, Redis],
        admin: Redis,
        redis_binary: RedisBinary,
        command: tuple[str, ...],
    ) -> None:
        """Administration, key-escaping and unneeded commands are refused by the ACL."""
        names = (
            bot_username(KEYS.namespace, BOT),
            streams_username(KEYS.namespace, BOT),
            replay_username(KEYS.namespace, BOT),
        )
        for username, user in zip(names, bot_logins, strict=True):
            if redis_binary.version >= (7, 0, 0):  # ask the ACL itself, whatever else blocks it
                dryrun = cast(Callable[..., Awaitable[Any]], admin.execute_command)
                verdict = await dryrun("ACL", "DRYRUN", username, *command)
                assert "no permissions" in verdict
            execute = cast(Callable[..., Awaitable[Any]], user.execute_command)
            unknown = command[0] in ("FUNCTION", "FCALL", "EVAL_RO")
            if unknown and redis_binary.version < (7, 0, 0):
                with pytest.raises(ResponseError, match="unknown command"):
                    await execute(*command)
            elif command[0] == "DEBUG" and redis_binary.version >= (7, 0, 0):
                with pytest.raises(ResponseError):  # 7.0 also has enable-debug-command no
                    await execute(*command)
            else:
                await refused(execute(*command))

    async def test_client_subcommands(self, bot_logins: tuple[Redis, Redis, Redis]) -> None:
        """Of CLIENT, the bot may name its connection, nothing more: no client's id, no
        unblocking or killing other clients."""
        for user in bot_logins:
            assert await user.client_setname("me")
            await refused(user.client_id())
            await refused(user.client_unblock(1))
            await refused(user.client_list())
            await refused(user.client_kill_filter(_id="1"))
            await refused(user.client_no_evict("on"))
            await refused(user.client_getname())
            await refused(user.client_info())


# -- managing users ------------------------------------------------------------------------


class TestUserLifecycle:
    async def test_ensure_is_idempotent(self, admin: Redis) -> None:
        """Ensuring twice leaves one user with the same rules and the latest password."""
        first = await ensure_bot_user(admin, KEYS, BOT, "one")
        before: Any = await admin.acl_getuser(first)
        second = await ensure_bot_user(admin, KEYS, BOT, "two")
        after: Any = await admin.acl_getuser(second)
        assert first == second == "multibot.bot.greeter"
        assert len(before.pop("passwords")) == len(after.pop("passwords")) == 1
        # The same rules; redis-py parses them into a list whose order can vary.
        assert sorted(before.pop("commands")) == sorted(after.pop("commands"))
        assert before == after
        assert await bot_users(admin, KEYS) == [
            "multibot.bot.greeter",
            "multibot.bot.greeter.replay",
            "multibot.bot.greeter.streams",
        ]

    async def test_password_change(self, admin: Redis, redis_url: str) -> None:
        """Ensuring with a new password makes the old one fail to log in."""
        username = await ensure_bot_user(admin, KEYS, BOT, "old")
        await ensure_bot_user(admin, KEYS, BOT, "new")
        with pytest.raises(AuthenticationError):
            await _ping(bot_redis_url(redis_url, username, "old"))
        assert await _ping(bot_redis_url(redis_url, username, "new"))

    async def test_ensure_replaces_old_rules(self, admin: Redis, redis_url: str) -> None:
        """A user with wider rules (e.g. from an older version) is narrowed by ensuring it."""
        username = bot_username(KEYS.namespace, BOT)
        wide = ["on", ">pw", "~*", "&*", "+@all"]
        await admin.execute_command("ACL", "SETUSER", username, *wide)  # type: ignore[no-untyped-call]
        await admin.set("other:x", "secret")
        url = bot_redis_url(redis_url, username, "pw")
        async with Redis.from_url(url, decode_responses=True) as bot:
            assert await bot.get("other:x") == "secret"
            await ensure_bot_user(admin, KEYS, BOT, "pw")
            await refused(bot.get("other:x"))  # the open connection is narrowed at once
            await refused(bot.flushall())
            assert await bot.xadd(KEYS.outbox(BOT), {"a": "1"})

    async def test_delete(self, admin: Redis, redis_url: str) -> None:
        """A deleted bot's user can no longer log in, and its open connections are closed."""
        url = await bot_url(admin, redis_url, BOT)
        with capture_logs() as logs:
            async with Redis.from_url(url, decode_responses=True) as bot:
                assert await bot.ping()
                assert await delete_bot_user(admin, KEYS, BOT) is True
                with pytest.raises(RedisConnectionError):
                    await bot.ping()  # Redis closed it; a reconnect could not log in
        with pytest.raises(AuthenticationError):
            await _ping(url)
        assert await delete_bot_user(admin, KEYS, BOT) is False
        assert await bot_users(admin, KEYS) == []
        assert [e["event"] for e in logs] == ["redis_acl.user_deleted"]

    async def test_bot_users_lists_only_the_namespace(self, admin: Redis) -> None:
        """Only bot users of this namespace are listed, not other namespaces or people."""
        for keys, bot_id in [(KEYS, "b"), (KEYS, "a"), (Keys("other"), "a"), (Keys("multi"), "c")]:
            await ensure_bot_user(admin, keys, bot_id, "pw")
        await admin.execute_command("ACL", "SETUSER", "alice", "on")  # type: ignore[no-untyped-call]
        ambiguous = "multibot.bot.x.bot.y"  # would be namespace "multibot.bot.x", bot "y"
        await admin.execute_command("ACL", "SETUSER", ambiguous)  # type: ignore[no-untyped-call]
        assert await bot_users(admin, KEYS) == [
            "multibot.bot.a",
            "multibot.bot.a.replay",
            "multibot.bot.a.streams",
            "multibot.bot.b",
            "multibot.bot.b.replay",
            "multibot.bot.b.streams",
        ]
        assert await bot_users(admin, Keys("other")) == [
            "other.bot.a",
            "other.bot.a.replay",
            "other.bot.a.streams",
        ]
        assert await bot_users(admin, Keys("multibot.bot.x")) == [ambiguous]

    async def test_ensure_logs_without_the_password(self, admin: Redis) -> None:
        """Ensuring logs the user and bot, never the password (Redis gets only its hash)."""
        password = generate_password()
        with capture_logs() as logs:
            await ensure_bot_user(admin, KEYS, BOT, password)
        assert [(e["event"], e["user"], e["bot_id"]) for e in logs] == [
            ("redis_acl.user_ensured", "multibot.bot.greeter", BOT),
            ("redis_acl.user_ensured", "multibot.bot.greeter.streams", BOT),
            ("redis_acl.user_ensured", "multibot.bot.greeter.replay", BOT),
        ]
        assert password not in repr(logs)
        described: Any = await admin.execute_command("ACL", "LIST")  # type: ignore[no-untyped-call]
        assert password not in repr(described)

    async def test_empty_password_refused(self, admin: Redis) -> None:
        """A user with an empty password is never created."""
        with pytest.raises(BotUserError, match="generate_password"):
            await ensure_bot_user(admin, KEYS, BOT, "")
        assert await bot_users(admin, KEYS) == []

    async def test_admin_without_acl_permission(self, admin: Redis, redis_url: str) -> None:
        """A manager connection that may not run ACL commands gets a clear ManagerError."""
        limited = ["on", ">pw", "~*", "&*", "+@all", "-acl"]
        await admin.execute_command("ACL", "SETUSER", "ops", *limited)  # type: ignore[no-untyped-call]
        async with Redis.from_url(bot_redis_url(redis_url, "ops", "pw")) as ops:
            with pytest.raises(RedisAclError, match="lacks permission") as info:
                await ensure_bot_user(ops, KEYS, BOT, "pw")
            assert isinstance(info.value, ManagerError)
            assert "multibot.bot.greeter" in str(info.value)
            with pytest.raises(RedisAclError, match="DELUSER"):
                await delete_bot_user(ops, KEYS, BOT)
            with pytest.raises(RedisAclError, match="USERS"):
                await bot_users(ops, KEYS)
        assert await bot_users(admin, KEYS) == []


class TestUrlsAgainstRedis:
    PASSWORD = "p@ss:w/rd?#%&= +é\\x"

    async def test_unix_socket_with_admin_password(
        self, redis_factory: RedisFactory, redis_binary: RedisBinary
    ) -> None:
        """Over a unix socket whose admin URL has a password, the bot URL logs in as the bot."""
        server = await redis_factory(binary=redis_binary, password="adm:in@", unix_socket=True)
        assert server.url.startswith("unix://")
        async with Redis.from_url(server.url, decode_responses=True) as admin:
            username = await ensure_bot_user(admin, KEYS, BOT, self.PASSWORD)
        url = bot_redis_url(server.url, username, self.PASSWORD)
        async with Redis.from_url(url, decode_responses=True) as bot:
            assert await bot.set(KEYS.bot_state(BOT, "x"), "1")
            await refused(bot.get("y"))

    async def test_tcp_with_special_password(self, admin: Redis, redis_url: str) -> None:
        """Over TCP, a password with URL-special characters survives the URL."""
        username = await ensure_bot_user(admin, KEYS, BOT, self.PASSWORD)
        assert await _ping(bot_redis_url(redis_url, username, self.PASSWORD))
        with pytest.raises(AuthenticationError):
            await _ping(bot_redis_url(redis_url, username, self.PASSWORD[:-1]))


async def _ping(url: str) -> bool:
    async with Redis.from_url(url) as client:
        return bool(await client.ping())
