"""Running one step every few seconds for ever: a failed round is logged, never fatal.

What a round failed on is logged once per outage (Redis away, say), not once per round,
and a round that works again after a failure says so; any other error is logged with its
traceback each time. Only cancellation ends the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from redis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from bus.backoff import REDIS_RETRY
from bus.connection import raise_swallowed_cancel
from bus.redis_errors import UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Outage:
    """Errors that mean a service is away for now: logged once until a round works."""

    errors: tuple[type[BaseException], ...]
    #: What the log says, like ``"Redis unavailable"``.
    name: str


#: Redis cannot be reached (connection refused or lost, timeout).
REDIS_UNAVAILABLE = Outage(UNAVAILABLE, "Redis unavailable")


class Periodic:
    """Calls ``step()`` every ``interval`` seconds until cancelled (see the module).

    ``what`` says what the step does, as in "cannot <what>: Redis unavailable".
    ``outages`` are tried in order (put a narrower error before a wider one: a
    PostgreSQL outage before Redis's, which is any OSError). ``retry`` is the wait after
    a failed round (default: ``interval``); ``resumed`` the message when a round works
    after a failed one.
    """

    def __init__(
        self,
        step: Callable[[], Awaitable[object]],
        interval: float,
        *,
        log: FilteringBoundLogger,
        what: str,
        outages: Sequence[Outage] = (REDIS_UNAVAILABLE,),
        retry: float | None = None,
        resumed: str | None = None,
    ) -> None:
        self._step = step
        self._interval = interval
        self._log = log
        self._what = what
        self._outages = tuple(outages)
        self._retry = interval if retry is None else retry
        self._resumed = resumed or f"can {what} again"
        #: What the last round failed on (an outage's name, or "error"); None if it worked.
        self.failing: str | None = None

    async def run(self) -> NoReturn:
        """Run rounds until cancelled."""
        while True:
            raise_swallowed_cancel()  # redis-py on 3.11 can drop a cancel mid-command
            worked = await self.round()
            await asyncio.sleep(self._interval if worked else self._retry)

    async def round(self) -> bool:
        """One call of the step, its failure logged; whether it worked."""
        try:
            await self._step()
        except Exception as exc:
            outage = next((o for o in self._outages if isinstance(exc, o.errors)), None)
            if outage is None:
                self.failing = "error"
                self._log.exception(f"cannot {self._what}; trying again next round")
            else:
                if self.failing != outage.name:
                    self._log.warning(f"cannot {self._what}: {outage.name}", error=str(exc))
                self.failing = outage.name
            return False
        if self.failing is not None:
            self._log.info(self._resumed, after=self.failing)
            self.failing = None
        return True

    def __repr__(self) -> str:
        return f"<Periodic {self._what!r} interval={self._interval} failing={self.failing}>"


async def every(
    interval: float,
    step: Callable[[], Awaitable[object]],
    *,
    log: FilteringBoundLogger,
    what: str,
    outages: Sequence[Outage] = (REDIS_UNAVAILABLE,),
    retry: float | None = None,
    resumed: str | None = None,
) -> NoReturn:
    """Call ``step()`` every ``interval`` seconds until cancelled (see :class:`Periodic`)."""
    await Periodic(
        step, interval, log=log, what=what, outages=outages, retry=retry, resumed=resumed
    ).run()


async def forever(
    step: Callable[[], Awaitable[object]],
    *,
    log: FilteringBoundLogger,
    what: str,
    waiting: str,
    failed: Callable[[], None] | None = None,
) -> NoReturn:
    """Call ``step()`` again and again until cancelled, for loops that wait inside the step
    (a blocking read). A failure backs off (:data:`bus.backoff.REDIS_RETRY`) and is logged:
    Redis away or refusing with ``waiting`` (where the work waits meanwhile), anything else
    with its traceback; ``failed()`` then forgets what the step had learned."""
    waits = REDIS_RETRY.waits()
    while True:
        raise_swallowed_cancel()  # redis-py on 3.11 can drop a cancel mid-command
        try:
            await step()
        except UNAVAILABLE as exc:
            log.warning(f"{what}: Redis unreachable; retrying", error=str(exc))
        except RedisError as exc:
            log.warning(f"{what}: Redis refused; {waiting}", error=f"{type(exc).__name__}: {exc}")
        except Exception:  # a bug here must not end the manager: the work waits in Redis
            log.exception(f"{what} failed; retrying")
        else:
            waits = REDIS_RETRY.waits()
            continue
        if failed is not None:
            failed()
        await asyncio.sleep(next(waits))
