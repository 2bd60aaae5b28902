"""The soak's reconciliation finds every lost event and tells explained duplicates from
unexplained ones (pure functions over ids: no servers)."""

from __future__ import annotations

from manager.soak.reconcile import (
    Catchup,
    DeadLetterRow,
    Handling,
    Kill,
    RedisKill,
    Window,
    per_fault,
    reconcile_archive,
    reconcile_group,
    recovery_time,
)

GROUP = "bot-group-soak-plain"
CONFIRMED = {"e1": 10.0, "e2": 11.0, "e3": 12.0}


class TestGroup:
    def test_everything_handled_is_nothing_lost(self) -> None:
        """Each confirmed event handled once: no loss, no duplicate."""
        handled = [Handling(i, 100, t + 0.01) for i, t in CONFIRMED.items()]
        result = reconcile_group(GROUP, CONFIRMED, handled, [])
        assert (result.handled, result.lost, result.duplicates) == (3, [], 0)

    def test_an_event_neither_handled_nor_dead_lettered_is_lost(self) -> None:
        """e3 was confirmed, and the group never saw it: lost."""
        handled = [Handling("e1", 100, 10.1), Handling("e2", 100, 11.1)]
        result = reconcile_group(GROUP, CONFIRMED, handled, [])
        assert result.lost == ["e3"]

    def test_a_dead_letter_of_this_group_accounts_for_an_event(self) -> None:
        """Dead-lettered by the group is not lost; by another group it does not count."""
        handled = [Handling("e1", 100, 10.1)]
        dead = [
            DeadLetterRow("e2", GROUP, "timeout"),
            DeadLetterRow("e3", "bot-group-x", "timeout"),
        ]
        result = reconcile_group(GROUP, CONFIRMED, handled, dead)
        assert result.lost == ["e3"]
        assert result.dead_lettered == {"timeout": 1}

    def test_a_duplicate_with_no_kill_is_unexplained(self) -> None:
        """Handled twice by live processes: an unexplained duplicate."""
        handled = [Handling(i, 100, t) for i, t in CONFIRMED.items()] + [Handling("e2", 101, 11.5)]
        result = reconcile_group(GROUP, CONFIRMED, handled, [])
        assert result.duplicates == 1
        assert result.duplicates_by_cause == {"unexplained": 1}
        assert result.unexplained_sample == ["e2"]

    def test_a_duplicate_whose_first_handler_was_killed_after_it_is_explained(self) -> None:
        """The first handling process was SIGKILLed right after: killed mid-flight."""
        handled = [Handling(i, 100, t) for i, t in CONFIRMED.items()] + [Handling("e2", 101, 14.0)]
        kills = [Kill(100, 12.5, "bot-kill")]
        result = reconcile_group(GROUP, CONFIRMED, handled, [], kills=kills)
        assert result.duplicates_by_cause == {"bot-kill": 1}

    def test_a_kill_long_before_or_after_explains_nothing(self) -> None:
        """A kill before the first handling, or far after it, is not the cause."""
        handled = [Handling("e1", 100, 10.0), Handling("e1", 101, 30.0)]
        for at in (9.0, 25.0):
            result = reconcile_group(
                GROUP, CONFIRMED, handled, [], kills=[Kill(100, at, "bot-kill")]
            )
            assert result.duplicates_by_cause == {"unexplained": 1}

    def test_handled_but_unconfirmed_is_counted_apart(self) -> None:
        """A handled event no publisher saw confirmed is neither confirmed nor lost."""
        handled = [Handling(i, 100, t) for i, t in CONFIRMED.items()] + [Handling("x", 100, 1.0)]
        result = reconcile_group(GROUP, CONFIRMED, handled, [])
        assert (result.handled, result.unconfirmed_handled, result.lost) == (3, 1, [])


class TestLostWithTheAof:
    """A redis-kill while Redis held AOF writes back (an fsync running under everysec)
    takes the events confirmed in the seconds before it: counted apart, not as lost."""

    def test_events_confirmed_just_before_a_kill_that_held_aof_writes_go_with_it(self) -> None:
        kill = RedisKill(13.5, aof_held=True)
        result = reconcile_group(GROUP, CONFIRMED, [], [], redis_kills=[kill])
        assert result.lost == ["e1"]  # 3.5 s before the kill: longer than Redis holds writes
        assert result.lost_with_aof == ["e2", "e3"]
        archive = reconcile_archive(CONFIRMED, {"e3": 13.0}, [], [kill])
        assert (archive.lost, archive.lost_with_aof) == (["e1"], ["e2"])

    def test_a_kill_that_held_nothing_explains_no_loss(self) -> None:
        """No fsync was running (or the AOF syncs on every write): every loss is a loss."""
        kill = RedisKill(12.5, aof_held=False)
        result = reconcile_group(GROUP, CONFIRMED, [], [], redis_kills=[kill])
        assert (result.lost, result.lost_with_aof) == (["e1", "e2", "e3"], [])

    def test_events_confirmed_after_the_kill_or_long_before_are_lost(self) -> None:
        confirmed = {"before": 5.0, "held": 9.0, "after": 10.5}
        result = reconcile_group(GROUP, confirmed, [], [], redis_kills=[RedisKill(10.0, True)])
        assert (result.lost, result.lost_with_aof) == (["after", "before"], ["held"])

    def test_the_fault_table_counts_them_apart(self) -> None:
        kill = RedisKill(13.5, aof_held=True)
        group = reconcile_group(GROUP, CONFIRMED, [], [], redis_kills=[kill])
        archive = reconcile_archive(CONFIRMED, dict(CONFIRMED), [], [kill])
        (fault,) = per_fault([Window("redis-kill", 13.4, 13.5)], CONFIRMED, [group], archive, [])
        assert (fault.lost, fault.lost_with_aof) == (0, 2)


class TestArchive:
    def test_an_event_missing_from_the_archive_is_lost(self) -> None:
        """Not stored and not set aside as unarchivable: lost."""
        result = reconcile_archive(CONFIRMED, {"e1": 10.5, "e2": 11.5}, [])
        assert (result.archived, result.lost) == (2, ["e3"])

    def test_an_unarchivable_dead_letter_accounts_for_an_event(self) -> None:
        """The archiver's dead letter explains the missing row."""
        dead = [DeadLetterRow("e3", "archiver", "unarchivable")]
        result = reconcile_archive(CONFIRMED, {"e1": 10.5, "e2": 11.5}, dead)
        assert (result.lost, result.unarchivable) == ([], 1)


class TestFaults:
    def test_recovery_waits_for_the_slowest_party(self) -> None:
        """From the fault's end until everything confirmed before it was handled."""
        catchup = Catchup(CONFIRMED, {"e1": 10.1, "e2": 15.0, "e3": 12.1})
        assert recovery_time(11.0, sorted(CONFIRMED.values()), [catchup]) == 4.0

    def test_loss_and_duplicates_are_put_down_to_the_fault_window(self) -> None:
        """A loss confirmed within a window counts for that fault class."""
        handled = [Handling("e1", 100, 10.6), Handling("e1", 100, 10.7)]
        group = reconcile_group(GROUP, CONFIRMED, handled, [])
        archive = reconcile_archive(CONFIRMED, dict.fromkeys(CONFIRMED, 13.0), [])
        windows = [Window("redis-pause", 10.5, 11.5), Window("redis-pause", 20.0, 21.0)]
        (result,) = per_fault(windows, CONFIRMED, [group], archive, [])
        assert (result.fault, result.injections) == ("redis-pause", 2)
        assert result.lost == 2  # e2 and e3, confirmed within 10 s of the first window
        assert result.duplicates == 1  # e1, first handled within the first window
