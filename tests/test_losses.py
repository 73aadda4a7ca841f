"""Placing a lab run's lost probes (netpass.lab.losses): pure."""

from __future__ import annotations

from typing import Any

from netpass.lab import losses


def result(runs: list[list[float]], **report: Any) -> dict[str, Any]:
    rep = {"tap_ring_overflow": 0, "hold_caught_up_ms": 100.0, "dest_ring_overflow": 0,
           "dest_replay_refused": 0, **report}
    return {"lost": int(sum(r[2] for r in runs)), "lost_runs_ms": runs, "pause_start_ms": 4000.0,
            "dst_resume_ms": 4300.0, "dst_tap_dropped": report.pop("dst_tap_dropped", 0), "report": rep}


def test_nothing_lost() -> None:
    assert losses.place({"lost": 0}) == losses.Placed(0, 0, 0)


def test_before_the_park_within_the_source_tap_overflow() -> None:
    # A busy-core CI: 38 probes sent in the 30 ms before the park, 236 frames
    # dropped by the source tap.
    res = result([[3970.0, 3998.5, 38]], tap_ring_overflow=236)
    assert losses.place(res) == losses.Placed(38, 0, 0)
    assert losses.place(res).vms_own == 38


def test_before_the_park_without_the_source_tap_showing_it_is_netpass_s() -> None:
    placed = losses.place(result([[3970.0, 3998.5, 38]], tap_ring_overflow=10))
    assert placed.in_session == 38 and placed.why


def test_before_the_park_within_the_guest_s_own_drops() -> None:
    # A busy-core CI: 26 probes lost around the arm, the source tap dropping
    # nothing, the guest's eth0 87,413 receive drops.
    res = result([[1848.3, 1961.3, 26]])
    res["guest_rx_dropped"] = 87_413
    assert losses.place(res) == losses.Placed(26, 0, 0)


def test_a_run_across_the_park_is_in_the_session() -> None:
    placed = losses.place(result([[3990.0, 4010.0, 5]], tap_ring_overflow=100))
    assert placed == losses.Placed(0, 5, 0, "lost between the park and the VM's catching up")


def test_after_the_catch_up_within_the_destination_tap_drops() -> None:
    res = result([[4500.0, 4510.0, 7]], dst_tap_dropped=50, dest_ring_overflow=0)
    assert losses.place(res) == losses.Placed(0, 0, 7)


def test_after_the_catch_up_beyond_what_the_tap_dropped_is_netpass_s() -> None:
    # The destination tap dropped 12, of which 10 in the session: 2 left.
    res = result([[4500.0, 4510.0, 7]], dst_tap_dropped=12, dest_ring_overflow=10)
    assert losses.place(res).in_session == 7


def test_between_resume_and_catch_up_is_in_the_session() -> None:
    res = result([[4350.0, 4360.0, 3]], dst_tap_dropped=50)
    assert losses.place(res).in_session == 3


def test_runs_that_do_not_add_up_are_all_netpass_s() -> None:
    res = result([[3970.0, 3998.5, 38]], tap_ring_overflow=236)
    res["lost"] = 40
    placed = losses.place(res)
    assert placed.in_session == 40 and placed.before_park == 0 and placed.why


def test_no_catch_up_time_puts_later_losses_in_the_session() -> None:
    res = result([[4500.0, 4510.0, 7]], dst_tap_dropped=50, hold_caught_up_ms=None)
    assert losses.place(res).in_session == 7


def test_the_matrix_counts_the_vms_own_apart() -> None:
    from netpass.lab import matrix
    own = result([[3970.0, 3998.5, 38]], tap_ring_overflow=236)
    mid = result([[4350.0, 4360.0, 3]])
    cell = matrix.Cell()
    cell.add(own)
    cell.add(mid)
    got = cell.summary()
    assert (got["lost_total"], got["vms_own_total"]) == (3, 38)
    plain = matrix.Cell()
    plain.add({"lost": 41, "lost_runs_ms": [[3970.0, 4200.0, 41]], "pause_start_ms": 4000.0})
    assert plain.summary()["lost_total"] == 41 and plain.summary()["vms_own_total"] == 0
