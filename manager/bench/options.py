"""The parameters of one benchmark run, validated once, and how they lay out on processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from manager.errors import ManagerError

#: Which phase a worker runs: bus clients, or the bare redis-py baseline.
Mode = Literal["bus", "raw"]

#: The one event type the bus producers publish (routed to one stream).
EVENT_TYPE = "bench.event.sent"
#: Routing table of the bench namespace: bench events to one stream, the idle probe to another.
ROUTES = {"bench": "bench", "bench.idle": "bench-idle"}
PRODUCER_BOT = "bench-producer"
CONSUMER_BOT = "bench-consumer"
FLAT_OUT_BATCH = 50
DRAIN_CAP_FACTOR = 6
#: Consumer group of the baseline (the bus names its own, ``bot-group-bench-consumer``).
RAW_GROUP = "bench-raw"


def bench_partitions(options: BenchOptions) -> dict[str, int]:
    """The bus's ``partitions`` setting of a run: the bench route's, when split."""
    return {ROUTES["bench"]: options.partitions} if options.partitions > 1 else {}


def raw_stream(namespace: str) -> str:
    """The baseline's stream key, inside the bench namespace (shaped like a bus stream key)."""
    return f"{namespace}:stream:{{bench-raw}}"


def raw_outbox(namespace: str) -> str:
    """The relayed baseline's outbox, where its producers write (shaped like a bot's)."""
    return f"{namespace}:outbox:{{bench-raw}}"


class BenchError(ManagerError):
    """The benchmark could not run (bad options, a worker process failed)."""


@dataclass(frozen=True, slots=True)
class Roles:
    """What one worker process runs: producer and consumer indices."""

    producers: tuple[int, ...] = ()
    consumers: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """``3 producers``, ``10 consumers``, ``2 producers + 2 consumers``."""
        parts = [
            f"{len(idx)} {name}{'s' if len(idx) != 1 else ''}"
            for name, idx in (("producer", self.producers), ("consumer", self.consumers))
            if idx
        ]
        return " + ".join(parts)


#: The bus's default ``consumer.read_count`` (not imported: the baseline never imports bus).
DEFAULT_READ_COUNT = 200


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """One benchmark run: ``producers`` publishers and ``consumers`` replicas of one bot.

    ``rate`` is the total offered events/s (0: flat out); ``batch`` is events per publish
    pipeline (None: 1 for rated runs, 50 flat out); ``read_count`` the consumers' XREADGROUP
    COUNT (None: 200, the bus default, for the bus and the baseline alike).
    """

    redis_url: str | None = None
    producers: int = 10
    consumers: int = 10
    rate: float = 1000.0
    duration: float = 10.0
    batch: int | None = None
    read_count: int | None = None
    processes: int = 2
    baseline: bool = True
    #: Also run the baseline through a bare relay (outbox, one script per read, stream), as
    #: the bus's bots publish: the floor of a path of two hops on this machine.
    relay_baseline: bool = False
    #: Whether the bus clients log in as a bot's Redis ACL user, as bots run by the manager
    #: do (False: the admin URL as given, to measure what the ACL checks cost).
    bot_user: bool = True
    #: Replicas that must confirm each publish (the bus's publish_replicas; 0: none).
    publish_replicas: int = 0
    #: Partition streams of the bench route (1: one stream, as before).
    partitions: int = 1
    #: Also run the bus phase with delivery records on (copied into PostgreSQL), right
    #: after the one with them off, and report both.
    deliveries: bool = False
    #: The PostgreSQL server of ``deliveries`` (None: a private one started for the run).
    postgres_dsn: str | None = None
    warmup: float = 1.0
    #: After the producers stop, wait for the consumers to catch up until they make no
    #: progress for this many seconds (and never longer than ``DRAIN_CAP_FACTOR`` times it).
    drain: float = 10.0

    def __post_init__(self) -> None:
        checks = [
            (self.producers >= 1, "--producers must be at least 1"),
            (self.consumers >= 1, "--consumers must be at least 1"),
            (self.rate >= 0, "--rate must be >= 0 (0 means flat out)"),
            (self.duration > 0, "--duration must be positive"),
            (self.batch is None or self.batch >= 1, "--batch must be at least 1"),
            (self.read_count is None or self.read_count >= 1, "--read-count must be >= 1"),
            (self.processes >= 1, "--processes must be at least 1"),
            (self.publish_replicas >= 0, "--publish-replicas must be >= 0"),
            (1 <= self.partitions <= 256, "--partitions must be within 1..256"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (
                self.bot_user or not self.deliveries,
                "--deliveries runs the bus as the manager's bots (outbox, relay): drop --as-admin",
            ),
            (self.deliveries or self.postgres_dsn is None, "--postgres-dsn needs --deliveries"),
            (self.baseline or not self.relay_baseline, "--relay-baseline needs the baseline"),
            (self.drain > 0, "drain must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise BenchError(message)

    @property
    def flat_out(self) -> bool:
        """Whether producers publish as fast as they can instead of at ``rate``."""
        return self.rate == 0

    @property
    def batch_size(self) -> int:
        """Events per publish pipeline and per read."""
        if self.batch is not None:
            return self.batch
        return FLAT_OUT_BATCH if self.flat_out else 1

    @property
    def read_size(self) -> int:
        """Entries a consumer fetches per read at most (COUNT)."""
        return DEFAULT_READ_COUNT if self.read_count is None else self.read_count

    @property
    def send_interval(self) -> float:
        """Seconds between two sends (of ``batch_size`` events) of one producer; 0 flat out."""
        if self.flat_out:
            return 0.0
        return self.batch_size * self.producers / self.rate

    def layout(self) -> tuple[Roles, ...]:
        """Roles of each worker process.

        One process runs everything with ``processes=1``. Otherwise producers get
        ``processes // 2`` processes and consumers the rest (each side capped at its
        count), roles dealt round-robin: the default 2 is one producer process and one
        consumer process.
        """
        if self.processes == 1:
            return (Roles(tuple(range(self.producers)), tuple(range(self.consumers))),)
        n_prod = min(self.producers, self.processes // 2)
        n_cons = min(self.consumers, self.processes - self.processes // 2)
        prods = [tuple(range(i, self.producers, n_prod)) for i in range(n_prod)]
        conss = [tuple(range(i, self.consumers, n_cons)) for i in range(n_cons)]
        return tuple(Roles(producers=p) for p in prods) + tuple(Roles(consumers=c) for c in conss)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the parent asks of one worker process."""

    mode: Mode
    index: int
    roles: Roles
    options: BenchOptions
    url: str
    namespace: str
    #: The producers' URL when it differs from ``url`` (a bot user of their own).
    producer_url: str | None = None
    #: The stream users' URLs of the consumers and the producers (a bot's second Redis
    #: user, as the manager gives its bots); None: ``url``/``producer_url`` for everything.
    streams_url: str | None = None
    producer_streams_url: str | None = None
    #: Whether the bus clients publish through their outbox (relayed by the parent).
    outbox: bool = False
    #: Whether the consumers write delivery records (through their outbox).
    delivery_records: bool = False

    @property
    def label(self) -> str:
        """``bus #1 (10 consumers)``; ``bus+records #1 …`` with delivery records on."""
        side = "baseline" if self.mode == "raw" else "bus"
        if self.mode == "raw" and self.outbox:
            side += "+relay"
        if self.delivery_records:
            side += "+records"
        return f"{side} #{self.index} ({self.roles.label})"


@dataclass(frozen=True, slots=True)
class IdleSpec:
    """The idle-client probe: one subscribed bus client with nothing to do."""

    url: str
    namespace: str

    @property
    def label(self) -> str:
        """How the parent names this child."""
        return "idle client"
