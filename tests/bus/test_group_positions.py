"""Group positions in the archive: recorded by stream and group, only ever moved forward."""

from __future__ import annotations

import pytest

from bus.archive import ArchiveStore
from bus.archive.group_positions import MAX_PART, clamp
from bus.keys import Keys

pytestmark = pytest.mark.postgres

KEYS = Keys()
USER, BOT = KEYS.stream("user"), KEYS.stream("bot")


class TestRecord:
    async def test_positions_round_trip_by_stream_key(self, store: ArchiveStore) -> None:
        """Recorded positions come back keyed by stream key and group, names or keys in."""
        positions = store.group_positions
        written = await positions.record({(USER, "g1"): (10, 2), ("bot", "g2"): (7, 0)})
        assert written == 2
        assert await positions.load() == {(USER, "g1"): (10, 2), (BOT, "g2"): (7, 0)}
        assert await positions.load([USER]) == {(USER, "g1"): (10, 2)}
        assert await positions.load(["bot"]) == {(BOT, "g2"): (7, 0)}
        assert await positions.load([]) == {}

    async def test_a_position_only_moves_forward(self, store: ArchiveStore) -> None:
        """A lower or equal position leaves the row alone; a higher one moves it."""
        positions = store.group_positions
        await positions.record({(USER, "g"): (100, 5)})
        assert await positions.record({(USER, "g"): (0, 0)}) == 0  # a group recreated at 0
        assert await positions.record({(USER, "g"): (100, 4)}) == 0
        assert await positions.record({(USER, "g"): (100, 5)}) == 0
        assert await positions.load() == {(USER, "g"): (100, 5)}
        assert await positions.record({(USER, "g"): (100, 6)}) == 1
        assert await positions.load() == {(USER, "g"): (100, 6)}

    async def test_the_same_group_twice_in_one_batch_keeps_the_highest(
        self, store: ArchiveStore
    ) -> None:
        """A stream named by key and by name in one batch is one row, at the higher one."""
        positions = store.group_positions
        assert await positions.record({(USER, "g"): (9, 0), ("user", "g"): (3, 0)}) == 1
        assert await positions.load() == {(USER, "g"): (9, 0)}

    async def test_nothing_to_record_touches_nothing(self, store: ArchiveStore) -> None:
        """An empty batch writes nothing."""
        assert await store.group_positions.record({}) == 0
        assert await store.group_positions.load() == {}

    async def test_ids_beyond_bigint_are_stored_lower(self, store: ArchiveStore) -> None:
        """A part above what bigint holds is stored as its maximum: lower, never higher."""
        positions = store.group_positions
        await positions.record({(USER, "g"): (5, 2**64 - 1)})
        assert await positions.load() == {(USER, "g"): (5, MAX_PART)}
        assert clamp((2**64 - 1, 0)) == (MAX_PART, MAX_PART)
        assert clamp((3, 4)) == (3, 4)
