"""Several archivers on one group (``archive.on_every_host``): each entry stored once,
and what a dead one had read and not acked taken over by another."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from bus.archive import ArchiveStore
from bus.keys import ARCHIVER_GROUP
from manager.archive.archiver import Archiver
from manager.archive.link import ArchiveLink
from manager.config import ArchiveSettings
from manager.embedded.postgres_server import PostgresServer
from tests.conftest import BusFactory
from tests.manager.archive.archive_support import (
    KEYS,
    archived,
    archiver_groups,
    archiving,
    caught_up,
    id_counts,
    positions,
    publish,
    running,
)
from tests.manager.archive.archiver_procs import ArchiverProcs, held_by, producing
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


async def consumers(redis: Redis) -> set[str]:
    """The consumer names in the archiver group, over its streams."""
    names: set[str] = set()
    for stream, _ in await archiver_groups(redis):
        rows: Any = await redis.xinfo_consumers(stream, ARCHIVER_GROUP)
        names |= {str(row["name"]) for row in rows}
    return names


class TestSeveralArchivers:
    async def test_entries_a_dead_archiver_left_unacked_are_taken_over_and_stored_once(
        self,
        admin: Redis,
        archive: ArchiveStore,
        link: ArchiveLink,
        bus_factory: BusFactory,
        postgres_server: PostgresServer,
    ) -> None:
        """Another consumer read every entry and died: after ``claim_idle`` this archiver
        claims them, stores each once and acks them; one trimmed meanwhile is only acked.
        The dead one, holding nothing now, is removed from the group; stopped, this one
        leaves it too (it holds nothing)."""
        producer = await bus_factory("producer")
        events = await publish(producer, 120)
        where = await positions(admin)
        for stream in {s for s, _ in where.values()} | {KEYS.dead_letters()}:
            await admin.xgroup_create(stream, ARCHIVER_GROUP, "0", mkstream=True)
            await admin.xreadgroup(ARCHIVER_GROUP, "archiver-gone", {stream: ">"}, count=1000)
        assert await held_by(admin, "archiver-gone") == 120
        stream, entry_id = where[events[0].id]
        await admin.xdel(stream, entry_id)  # trimmed while it was pending

        archiver = Archiver(
            admin, KEYS, ArchiveSettings(claim_idle=0.3, fill_wait=0.05), link.get,
            consumer="archiver-b", leave_on_stop=True,
        )  # fmt: skip
        async with archiving(archiver) as task:
            await wait_until(
                lambda: archived(archive, 119, running(task)), what="the claimed entries stored"
            )
            await wait_until(lambda: caught_up(admin), what="every claimed entry acked")
            await wait_until(
                lambda: _left(admin, "archiver-gone"), what="the dead one removed from the group"
            )
        counts = await id_counts(postgres_server.dsn)
        assert counts.keys() == {e.id for e in events[1:]}
        assert set(counts.values()) == {1}
        assert "archiver-b" not in await consumers(admin)  # left: it held nothing

    async def test_two_archiver_processes_share_the_load_and_survive_one_killed(
        self,
        admin: Redis,
        archive: ArchiveStore,
        bus_factory: BusFactory,
        archiver_procs: ArchiverProcs,
        postgres_server: PostgresServer,
    ) -> None:
        """Two archivers under a steady load both take batches; one SIGKILLed with a batch
        in flight, the other claims it: every event stored exactly once, nothing pending;
        the killed one is removed from the group, and the survivor, stopped cleanly,
        leaves it."""
        producer = await bus_factory("producer")
        published = [e.id for e in await publish(producer, 30)]  # every stream exists
        async with producing(producer, published):
            a = await archiver_procs(batch_size=20, consumer="archiver-a", claim_idle=1.0)
            b = await archiver_procs(batch_size=20, consumer="archiver-b", claim_idle=1.0)
            await wait_until(
                lambda: archived(archive, 300, b.check_alive), timeout=20, what="archiving"
            )
            assert {"archiver-a", "archiver-b"} <= await consumers(admin)
            held = await a.kill_mid_batch(admin, "archiver-a")
            floor = await archive.count()
            await wait_until(
                lambda: archived(archive, floor + 200, b.check_alive), timeout=20, what="b alone"
            )
        await wait_until(
            lambda: archived(archive, len(published), b.check_alive),
            timeout=20,
            what=f"all {len(published)} archived",
        )
        await wait_until(lambda: caught_up(admin), what="every entry acked, a's claimed too")
        assert held > 0
        assert await held_by(admin, "archiver-a") == 0
        await wait_until(lambda: _left(admin, "archiver-a"), what="the killed one removed")
        assert await b.terminate() == 0
        assert "archiver-b" not in await consumers(admin)
        counts = await id_counts(postgres_server.dsn)
        assert [i for i, n in counts.items() if n > 1] == []
        assert counts.keys() == set(published)


async def _left(redis: Redis, consumer: str) -> bool:
    return consumer not in await consumers(redis)
