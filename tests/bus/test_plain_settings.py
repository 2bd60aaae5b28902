"""The plain settings keep in step with the validated ones, and the bus takes either kind."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from bus.client import BusClient
from bus.event import Event
from bus.plain_settings import (
    PlainBreakerSettings,
    PlainBusSettings,
    PlainConsumerSettings,
    PlainRetrySettings,
)
from bus.settings import (
    BreakerSettings,
    BusSettings,
    ConsumerSettings,
    RetrySettings,
)
from tests.support import running, wait_until

PAIRS: list[tuple[type[BaseModel], Any]] = [
    (BusSettings, PlainBusSettings),
    (ConsumerSettings, PlainConsumerSettings),
    (RetrySettings, PlainRetrySettings),
    (BreakerSettings, PlainBreakerSettings),
]


class TestInStep:
    @pytest.mark.parametrize(("model", "plain"), PAIRS, ids=[m.__name__ for m, _ in PAIRS])
    def test_same_fields(self, model: type[BaseModel], plain: Any) -> None:
        """Each plain class has exactly the fields of its validated model."""
        assert {field.name for field in dataclasses.fields(plain)} == set(model.model_fields)

    def test_same_defaults(self) -> None:
        """The validated defaults, dumped and read back, are the plain defaults."""
        assert PlainBusSettings.from_json(BusSettings().model_dump(mode="json")) == (
            PlainBusSettings()
        )

    def test_every_value_comes_through(self) -> None:
        """Settings away from every default read back field by field, nested ones too."""
        settings = BusSettings(
            redis_url="redis://u:p@127.0.0.1:6379/1",
            streams_url="redis://s:p@127.0.0.1:6379/1",
            inboxes=True,
            namespace="ns",
            routes={"user": "users"},
            default_stream="users",
            partitions={"users": 3},
            strict_schemas=True,
            publish_replicas=1,
            outbox=True,
            delivery_records=True,
            archive_dsn="postgresql://reader@localhost/db",
            consumer=ConsumerSettings(
                concurrency=4,
                handler_timeout=None,
                start_id="0",
                retry=RetrySettings(max_attempts=9, jitter=0.0),
                breaker=BreakerSettings(failure_threshold=0),
            ),
        )
        plain = PlainBusSettings.from_json(settings.model_dump(mode="json"))
        assert dataclasses.asdict(plain) == settings.model_dump()
        assert isinstance(plain.consumer.retry, PlainRetrySettings)

    @pytest.mark.parametrize(
        "fields",
        [{"colour": "blue"}, {"consumer": {"colour": "blue"}}, {"consumer": {"retry": {"x": 1}}}],
        ids=["bus", "consumer", "retry"],
    )
    def test_an_unknown_key_is_refused(self, fields: dict[str, object]) -> None:
        """As the validated settings, the plain ones take no key they do not know."""
        with pytest.raises(TypeError):
            PlainBusSettings.from_json(fields)

    def test_frozen(self) -> None:
        """Plain settings, like the validated ones, cannot be changed once made."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            PlainBusSettings().namespace = "other"  # type: ignore[misc]


class TestEitherKind:
    def test_a_client_without_settings_gets_the_plain_defaults(self) -> None:
        """No settings given: the defaults, as plain settings (no pydantic needed for them)."""
        assert BusClient("x").settings == PlainBusSettings()

    @pytest.mark.redis
    @pytest.mark.one_redis
    async def test_a_client_on_plain_settings_publishes_and_consumes(self, redis_url: str) -> None:
        """The whole bus runs on plain settings, consumer settings and subscription retries."""
        consumer = PlainConsumerSettings(block_ms=200, start_id="0")
        settings = PlainBusSettings(redis_url=redis_url, namespace="plain", consumer=consumer)
        seen: list[Event] = []
        async with BusClient("plain", settings=settings) as bus:

            async def handler(event: Event) -> None:
                seen.append(event)

            bus.subscribe("plain.thing.done", handler, retry=PlainRetrySettings(max_attempts=1))
            await bus.publish("plain.thing.done", {"n": 1})
            async with running(bus):
                await wait_until(lambda: len(seen) == 1, what="the event handled")
        assert seen[0].data == {"n": 1}
