"""Test a bot against the real bus: run its ``main(bus)`` and assert what it published.

::

    from bus.testing import TestBus

    async def test_greeter_answers() -> None:
        async with TestBus("greeter") as bus:
            await bus.start(main)  # the bot's async def main(bus), in the background
            msg = await bus.publish("user.message.received", {"user_id": 1, "bot_id": "greeter"})
            sent = await bus.wait_for("user.message.sent", caused_by=msg)
            assert sent.data["user_id"] == 1

Design: a real Redis, not an in-memory fake. Each :class:`TestBus` starts a private
redis-server (:func:`private_redis`, some 20 ms; or uses ``redis_url=`` and a fresh
namespace there), so the bot runs on the very consumer it runs on in production: consumer
groups, per-key order, retries, dead letters, schemas, conditions and the Redis state the
bot keeps itself. A fake would have to re-implement those semantics and would drift from
them; what a test of the bot then proves would be about the fake. The streams are the
record: :meth:`TestBus.published` and :meth:`TestBus.wait_for` read them (``wait_for``
blocks on XREAD, so nothing sleeps), :meth:`TestBus.idle` waits until the bot's group has
read and acked everything, :meth:`TestBus.dead_letters` lists what its handlers could not
take. A bot whose main raises is reported (:class:`BotCrashedError`) by the wait it breaks
or at the end of the block; the bot is stopped gracefully there too.

No pytest needed: the errors are ``AssertionError`` subclasses, which pytest shows as
failures, and every wait is bounded. To run several TestBus on one server (each gets a
namespace of its own there, removed at the end), start it in a fixture::

    @pytest.fixture
    async def redis_url() -> AsyncIterator[str]:
        async with private_redis() as url:
            yield url

    async def test_greeter(redis_url: str) -> None:
        async with TestBus("greeter", redis_url=redis_url) as bus: ...

Nothing here imports the manager: the launcher is its own, small one.
"""

from bus.testing.harness import TEST_CONSUMER, BotCrashedError, TestBus, WaitTimeoutError
from bus.testing.server import RedisServerError, private_redis, redis_server_binary

__all__ = [
    "TEST_CONSUMER",
    "BotCrashedError",
    "RedisServerError",
    "TestBus",
    "WaitTimeoutError",
    "private_redis",
    "redis_server_binary",
]
