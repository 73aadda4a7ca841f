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
