from __future__ import annotations

import pytest

from netpass.session import State, StateError, StateMachine


def test_happy_path() -> None:
    sm = StateMachine("s1")
    for st in (State.ARMED, State.CAPTURING, State.SHIPPING, State.REPLAYING, State.DONE):
        sm.to(st)
    assert sm.final and [h[1] for h in sm.history][-1] == "done"


@pytest.mark.parametrize("path", [
    [State.CAPTURING],
    [State.ARMED, State.REPLAYING],
    [State.ARMED, State.DONE, State.FAILED],
])
def test_illegal_transitions(path: list[State]) -> None:
    sm = StateMachine("s2")
    with pytest.raises(StateError):
        for st in path:
            sm.to(st)


def test_fail_from_anywhere_and_once() -> None:
    for stop_at in (State.NEW, State.ARMED, State.CAPTURING):
        sm = StateMachine("s3")
        for st in (State.ARMED, State.CAPTURING):
            if sm.state is stop_at:
                break
            sm.to(st)
        sm.fail("boom")
        sm.fail("again")
        assert sm.state is State.FAILED and sm.reason == "boom"


# -- the source's phases ------------------------------------------------------------------
from netpass.session import Phase, Phases  # noqa: E402


def test_phases_follow_the_usual_order() -> None:
    ph = Phases("s")
    for p in (Phase.ARMED, Phase.PARKED, Phase.STOPPED, Phase.COMPLETED, Phase.RESUMED, Phase.DONE):
        assert ph.reach(p)
    assert [s for _t, s in ph.history] == ["armed", "parked", "stopped", "completed", "resumed", "done"]


def test_a_later_phase_implies_the_ones_never_seen() -> None:
    """The monitor closed before its STOP and MIGRATION events were read: the
    destination's resume implies them."""
    ph = Phases("s")
    ph.reach(Phase.ARMED)
    ph.reach(Phase.PARKED)
    assert ph.reach(Phase.RESUMED, "the destination runs")
    assert [s for _t, s in ph.history] == ["armed", "parked", "stopped", "completed", "resumed"]
    assert ph.past(Phase.STOPPED) and ph.past(Phase.COMPLETED)


def test_an_event_seen_late_never_moves_back() -> None:
    """A STOP event read after 'completed' (or the park after an unforeseen stop)."""
    ph = Phases("s")
    ph.reach(Phase.ARMED)
    ph.reach(Phase.COMPLETED)
    assert ph.reach(Phase.STOPPED) is False
    assert ph.reach(Phase.PARKED) is False
    assert ph.phase is Phase.COMPLETED


def test_giving_back_only_after_the_park_and_failed_from_anywhere() -> None:
    ph = Phases("s")
    ph.reach(Phase.ARMED)
    with pytest.raises(StateError):
        ph.reach(Phase.GIVING_BACK)
    ph.reach(Phase.PARKED)
    assert ph.reach(Phase.GIVING_BACK)
    with pytest.raises(StateError):
        ph.reach(Phase.RESUMED)  # nothing goes on after a give-back but its end
    assert ph.reach(Phase.FAILED, "cancelled")
    assert ph.reason == "cancelled"
    with pytest.raises(StateError):
        ph.reach(Phase.FAILED)


def test_done_needs_the_destination_running_and_require_guards_steps() -> None:
    ph = Phases("s")
    ph.reach(Phase.ARMED)
    with pytest.raises(StateError):
        ph.reach(Phase.DONE)
    ph.require(Phase.ARMED)
    with pytest.raises(StateError, match="not allowed in phase armed"):
        ph.require(Phase.NEW)


def test_the_stop_plan() -> None:
    from netpass.session import StopPlan, plan_stop
    assert plan_stop(parked=True, verified=True) == StopPlan(park_now=False, settle=False)  # the planned park
    assert plan_stop(parked=True, verified=False) == StopPlan(park_now=False, settle=True)
    assert plan_stop(parked=False, verified=False) == StopPlan(park_now=True, settle=True)  # unforeseen
    assert plan_stop(parked=False, verified=True).park_now
