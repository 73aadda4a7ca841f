"""What the source QEMU says of its migration (netpass.watch): fed events
and polled statuses in the orders a real monitor gives them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from netpass.session import Phase, Phases, plan_stop
from netpass.watch import AtPreSwitchover, Completed, Failed, Stopped, Watch


def mig(status: str) -> tuple[str, dict[str, str]]:
    return "MIGRATION", {"status": status}


def test_the_usual_order_with_a_pause_before_the_switchover() -> None:
    w = Watch()
    assert w.event(*mig("active"), 0.5) == []
    assert w.event("STOP", {}, 1.0) == [Stopped(1.0, "STOP event")]
    assert w.event(*mig("pre-switchover"), 1.01) == [AtPreSwitchover()]
    assert w.event(*mig("device"), 1.2) == []
    assert w.event(*mig("completed"), 1.3) == [Completed(1.3)]
    assert w.completed and w.stop_t == 1.0 and w.ended


def test_a_poll_sees_the_end_before_any_event_then_the_stop_event_comes_late() -> None:
    # A kill at completion: the events may never be read; a poll says completed.
    w = Watch()
    assert w.polled({"status": "active"}) == []
    assert w.polled({"status": "completed"}) == [Stopped(None, "query-migrate said completed"),
                                                  Completed(None)]
    # Read afterwards, the STOP event gives the stop its real time.
    assert w.event("STOP", {}, 0.9) == [Stopped(0.9, "STOP event", first=False)]
    assert w.event(*mig("completed"), 1.3) == []  # already ended
    assert w.polled({"status": "completed"}) == []


def test_the_switchover_statuses_mean_the_vm_stopped() -> None:
    for status in ("pre-switchover", "device"):
        w = Watch()
        facts = w.polled({"status": status})
        assert facts[0] == Stopped(None, f"query-migrate said {status}")
        assert w.stopped and w.stop_t is None


def test_a_management_layer_s_stop_before_the_switchover() -> None:
    w = Watch()
    assert w.event("STOP", {}, 2.0) == [Stopped(2.0, "STOP event")]
    assert w.polled({"status": "active"}) == []  # the RAM still goes, the VM is stopped
    assert w.event("STOP", {}, 2.5) == []  # a later STOP does not move it forward
    assert w.event(*mig("completed"), 3.0) == [Completed(3.0)]


def test_failure_and_cancel_end_it_once() -> None:
    for status in ("failed", "cancelled"):
        w = Watch()
        assert w.event(*mig(status), 1.0) == [Failed(status)]
        assert w.polled({"status": status}) == [] and w.ended and not w.completed


def test_a_source_that_exited_after_the_park_stopped_and_ended() -> None:
    """Killed at completion with its last events unread: stopped and ended,
    once; a stop already read is not told again."""
    w = Watch()
    assert w.polled({"status": "active"}) == []
    assert w.exited_after_park() == [Stopped(None, "the source QEMU exited"), Completed(None)]
    assert w.exited_after_park() == []
    w = Watch()
    assert w.event("STOP", {}, 1.0) == [Stopped(1.0, "STOP event")]
    assert w.exited_after_park() == [Completed(None)]
    assert w.stop_t == 1.0 and w.ended


def test_other_events_say_nothing() -> None:
    w = Watch()
    assert w.event("RESUME", {}, 1.0) == [] and w.event("NIC_RX_FILTER_CHANGED", {}, 1.0) == []
    assert not w.stopped and w.status == "none"


# -- recorded lab sessions ---------------------------------------------------------------------

TRACES = sorted((Path(__file__).parent / "data" / "control").glob("*.jsonl"))


def replay(lines: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """A recorded session's control inputs through the core: what the source
    QEMU said (events, polled statuses) through the watch, the park and the
    destination's resume at their recorded times, each fact acted on as
    netpass migrate acts on it (source.py), into a fresh phase machine.
    Returns each phase reached with the time of the input that moved it."""
    inputs: list[tuple[float, str, dict[str, Any]]] = [(x["t"], "qemu", x) for x in lines[:-1]]
    for t, phase in lines[-1]["phases"]:
        if phase in ("parked", "resumed"):
            inputs.append((t, phase, {}))
    inputs.sort(key=lambda x: x[0])
    w, ph = Watch(), Phases("replay")
    ph.reach(Phase.ARMED)
    out = [(lines[-1]["phases"][0][0], "armed")]
    for t, kind, x in inputs:
        seen = len(ph.history)
        if kind == "parked":
            ph.reach(Phase.PARKED)
        elif kind == "resumed":
            ph.reach(Phase.RESUMED)
        else:
            facts = w.event(x["event"], x.get("data") or {}, x.get("emitted")) if "event" in x \
                else w.polled({"status": x["polled"]})
            for fact in facts:
                if isinstance(fact, Stopped) and fact.first:
                    if plan_stop(ph.past(Phase.PARKED), True).park_now:
                        ph.reach(Phase.PARKED, "unforeseen")
                    ph.reach(Phase.STOPPED, fact.why)
                elif isinstance(fact, Completed):
                    ph.reach(Phase.COMPLETED)
        out += [(t, p) for _t, p in ph.history[seen:]]
    return out


@pytest.mark.parametrize("trace", TRACES, ids=[t.stem for t in TRACES])
def test_a_recorded_lab_session_replays_to_the_phases_it_reached(trace: Path) -> None:
    """tests/data/control holds what real lab sessions' source QEMU said
    (NETPASS_CONTROL_TRACE, see docs/lab.md) and the phases each reached.
    Replayed through the watch and the phase machine, each reaches the
    same phases in the same order, each moved by an input the session had
    read by then (at most 50 ms before the session recorded it: what it
    did in between was I/O)."""
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    recorded = [(t, p) for t, p in lines[-1]["phases"] if p != "done"]
    replayed = replay(lines)
    assert [p for _t, p in replayed] == [p for _t, p in recorded]
    for (t_replay, phase), (t_real, _p) in zip(replayed, recorded, strict=True):
        assert 0 <= t_real - t_replay < 0.05, (phase, t_real - t_replay)


def test_there_are_recorded_sessions() -> None:
    assert len(TRACES) >= 2
