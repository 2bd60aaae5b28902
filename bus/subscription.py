"""A subscription: which events (pattern + conditions) go to which handler, and how; the
registry of those a client declared; what the operator allows a bot to receive."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

from bus.backoff import Backoff
from bus.breaker import CircuitBreaker
from bus.conditions import Predicate, Where, compile_where
from bus.errors import SubscriptionError
from bus.event import Event
from bus.keys import Keys
from bus.patterns import Pattern
from bus.plain_settings import (
    AnyBreakerSettings,
    AnyConsumerSettings,
    AnyRetrySettings,
    PlainRetrySettings,
)
from bus.routing import Router

if TYPE_CHECKING:
    from pydantic import BaseModel

Handler = Callable[[Event], Awaitable[Any]]
ModelHandler = Callable[[Event, Any], Awaitable[Any]]
BatchHandler = Callable[[Sequence[Event]], Awaitable[Any]]
AnyHandler = Handler | ModelHandler | BatchHandler


@dataclass(eq=False)
class Subscription:
    """One handler's subscription. Built by ``BusClient.subscribe``; state lives here too."""

    name: str
    pattern: Pattern
    handler: AnyHandler
    where: Predicate | None = None
    where_spec: dict[str, Any] | None = None
    #: Parse ``data`` into this model and pass it as the handler's second argument.
    model: type[BaseModel] | None = None
    retry: AnyRetrySettings = field(default_factory=PlainRetrySettings)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    #: Hand the handler lists of up to this many events (None: one event at a time).
    batch_size: int | None = None
    #: Longest wait for a batch to fill, in seconds.
    batch_wait: float = 0.05
    #: Run at most once per event id in this group, remembered this many seconds.
    idempotent_ttl: float | None = None
    #: Seconds one handler call may run before it is cancelled (None: no limit).
    timeout: float | None = None
    streams: frozenset[str] = frozenset()
    backoff: Backoff = field(init=False)

    def __post_init__(self) -> None:
        r = self.retry
        self.backoff = Backoff(base=r.backoff_base, cap=r.backoff_cap, jitter=r.jitter)

    def accepts(self, event: Event) -> bool:
        """Whether this subscription wants the event (pattern, then conditions)."""
        return self.pattern.matches(event.type) and (self.where is None or self.where(event.data))

    def describe(self) -> dict[str, Any]:
        """Serialisable description (what the coordinator stores later)."""
        return {
            "name": self.name,
            "pattern": self.pattern.text,
            "where": self.where_spec,
            "batch_size": self.batch_size,
            "idempotent_ttl": self.idempotent_ttl,
            "timeout": self.timeout,
            "breaker": self.breaker.state.value,
        }

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.name} pattern={self.pattern.text} breaker={self.breaker.state}>"
        )


def build_subscription(
    pattern: str,
    handler: AnyHandler,
    *,
    where: Mapping[str, Any] | Predicate | None,
    name: str | None,
    model: type[BaseModel] | None,
    retry: AnyRetrySettings,
    breaker: AnyBreakerSettings,
    batch: int | None,
    batch_wait: float,
    idempotent_ttl: float | None,
    timeout: float | None = None,
) -> Subscription:
    """Check the options of a subscription and build it."""
    if not callable(handler):
        raise SubscriptionError(f"handler for {pattern!r} is not callable")
    if batch is not None and batch < 1:
        raise SubscriptionError(f"batch must be at least 1, got {batch}")
    if batch is not None and model is not None:
        raise SubscriptionError("batch handlers receive events; parse data with model yourself")
    if idempotent_ttl is not None and idempotent_ttl <= 0:
        raise SubscriptionError("idempotent_ttl must be a positive number of seconds")
    if timeout is not None and timeout <= 0:
        raise SubscriptionError("timeout must be a positive number of seconds (None: no limit)")
    compiled = Pattern(pattern)
    return Subscription(
        name=name or getattr(handler, "__qualname__", None) or compiled.text,
        pattern=compiled,
        handler=handler,
        where=compile_where(where),
        where_spec=Where(where).to_json() if isinstance(where, Mapping) else None,
        model=model,
        retry=retry,
        breaker=CircuitBreaker(breaker.failure_threshold, breaker.cooldown),
        batch_size=batch,
        batch_wait=batch_wait,
        idempotent_ttl=idempotent_ttl,
        timeout=timeout,
    )


class SubscribeOptions(TypedDict, total=False):
    """The options of ``BusClient.subscribe`` (see there), each optional."""

    where: Mapping[str, Any] | Predicate | None
    name: str | None
    model: type[BaseModel] | None
    retry: AnyRetrySettings | None
    breaker: AnyBreakerSettings | None
    batch: int | None
    batch_wait: float
    idempotent_ttl: float | None
    timeout: float | Literal["default"] | None


class SubscriptionRegistry:
    """The subscriptions one client declared, in order: built with the consumer settings'
    defaults, unique by name, each with the streams its pattern is routed to."""

    def __init__(self, settings: AnyConsumerSettings, router: Router, keys: Keys) -> None:
        self._settings = settings
        self._router = router
        self._keys = keys
        self._subs: list[Subscription] = []

    def add(
        self, pattern: str, handler: AnyHandler, **options: Unpack[SubscribeOptions]
    ) -> Subscription:
        """Build and declare a subscription (the options of ``BusClient.subscribe``; None
        ``retry`` and ``breaker`` and ``"default"`` ``timeout`` take the settings' values).

        Raises :class:`SubscriptionError` for a bad option or a name declared already."""
        unknown = sorted(set(options) - SubscribeOptions.__optional_keys__)
        if unknown:
            known = ", ".join(sorted(SubscribeOptions.__optional_keys__))
            raise SubscriptionError(f"unknown subscribe option(s) {unknown}: use {known}")
        timeout = options.get("timeout", "default")
        sub = build_subscription(
            pattern,
            handler,
            where=options.get("where"),
            name=options.get("name"),
            model=options.get("model"),
            retry=options.get("retry") or self._settings.retry,
            breaker=options.get("breaker") or self._settings.breaker,
            batch=options.get("batch"),
            batch_wait=options.get("batch_wait", 0.05),
            idempotent_ttl=options.get("idempotent_ttl"),
            timeout=self._settings.handler_timeout if timeout == "default" else timeout,
        )
        if any(s.name == sub.name for s in self._subs):
            raise SubscriptionError(
                f"a subscription named {sub.name!r} exists already: pass name= to tell "
                "them apart (the name is how dead letters are retried to one handler)"
            )
        sub.streams = frozenset(self._keys.stream(s) for s in self._router.streams_for(sub.pattern))
        self._subs.append(sub)
        return sub

    def __iter__(self) -> Iterator[Subscription]:
        return iter(self._subs)

    def __len__(self) -> int:
        return len(self._subs)

    def __repr__(self) -> str:
        return f"<SubscriptionRegistry {[s.name for s in self._subs]}>"


class Allowed:
    """What the operator declared a bot receives: (pattern, conditions) pairs from its config.

    An event outside all of them is acked without reaching any handler, whatever the bot's
    code subscribed to; so an operator narrows a bot (``where = {lang = "en"}``) without
    touching its code.
    """

    def __init__(self, declared: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        self._rules = [(Pattern(pattern), compile_where(where)) for pattern, where in declared]

    def allows(self, event: Event) -> bool:
        """Whether some declared subscription matches the event's type and data."""
        return any(
            pattern.matches(event.type) and (where is None or where(event.data))
            for pattern, where in self._rules
        )

    def __repr__(self) -> str:
        return f"<Allowed {[p.text for p, _ in self._rules]}>"
