"""What the source QEMU says of its migration (netpass.watch): fed events
and polled statuses in the orders a real monitor gives them."""

from __future__ import annotations

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


def test_other_events_say_nothing() -> None:
    w = Watch()
    assert w.event("RESUME", {}, 1.0) == [] and w.event("NIC_RX_FILTER_CHANGED", {}, 1.0) == []
    assert not w.stopped and w.status == "none"
