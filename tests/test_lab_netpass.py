"""Zero-loss switchover, for real: netpass agent and migrate in the lab.

Every zero-loss assertion here has its twin run against plain migration
with the same knobs, which must fail it: that is what gives the test teeth.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from netpass.lab import losses, scenario

pytestmark = pytest.mark.lab


def run(image: Any, mode: str, expect_ok: bool = True, guest_crash_ok: bool = False, **kw: Any) -> dict[str, Any]:
    """One lab migration.  ``guest_crash_ok``: the test's claims do not
    involve the guest after the resume (see below), so a crash there is
    only warned of."""
    res = scenario.run_migration_scenario(image, scenario.ScenarioOptions(mode=mode, **kw),
                                          lambda m: None)
    if res.get("dst_guest_fault") and guest_crash_ok:
        warnings.warn(f"destination guest kernel crashed: {res['dst_guest_fault']}", stacklevel=2)
    elif res.get("dst_guest_fault"):
        # QEMU 7.2 under TCG sometimes migrates a guest that then crashes on
        # the destination, with or without netpass (plain QEMU: 1 of 10 at
        # 4,000 pps).  Its console says so; that is not a network verdict,
        # so such a run is repeated once, and a second crash fails the test.
        warnings.warn(f"destination guest kernel crashed, running again: {res['dst_guest_fault']}", stacklevel=2)
        res = scenario.run_migration_scenario(image, scenario.ScenarioOptions(mode=mode, **kw),
                                              lambda m: None)
    assert guest_crash_ok or res.get("dst_guest_fault") is None, \
        f"the destination guest kernel crashed: {res['dst_guest_fault']}"
    if mode == "netpass" and expect_ok:
        rep = res["report"]
        assert rep.get("exit_code") == 0, (rep.get("error"), rep.get("logs"))
    return res


def summary(res: dict[str, Any]) -> str:
    """What to look at when a lab assertion fails, as a string: pytest shows
    an assertion's message whole only when it is one (a dict is cut at 240
    characters, which hid all of this in a CI failure)."""
    rep = res.get("report") or {}
    keys = ("sent", "lost", "reordered", "duplicates", "guest_in_echos", "guest_icmp_out_errors",
            "guest_rx_dropped",
            "first_lost_id", "last_lost_id", "first_lost_sent_ms", "last_lost_sent_ms", "first_duplicate_id",
            "first_reordered_id",
            "first_reordered_rx_ms",
            "src_stop_ms", "pause_start_ms", "dst_resume_ms", "dst_guest_fault", "dst_leftovers",
            "burst_sent", "dst_tap_dropped")
    out = {k: res.get(k) for k in keys}
    out["reorders_ms"] = (res.get("reorders_ms") or [])[:8]  # [id, received, highest before it]
    out["report"] = {k: rep.get(k) for k in ("exit_code", "error", "stop_path", "swallowed_account",
                                              "frames_captured", "frames_replayed",
                                              "duplicates_suppressed", "frames_recovered_from_shadow",
                                              "frames_dropped", "notes",
                                              "held_rx", "held_tx", "hold_ms", "replay_delay_ms",
                                              "tap_ring_overflow", "park_to_stop_ms", "verified_to_stop_ms",
                                              "dest_ring_overflow", "frames_after_resume",
                                              "reordered_estimate", "network_pause_ms", "endgame",
                                              "vm_replay_read_fps", "batches",
                                              "dest_replay_refused", "dest_ring_overflow_after_hold",
                                              "hold_caught_up_ms", "hold_notes", "replay_refused")}
    # The source's account of the stop: which frames QEMU read and never
    # delivered (a loss or a duplicate of one is decided there).
    log_text = (rep.get("logs") or {}).get("migrate", "")
    out["accounting"] = [line.split(": ", 1)[-1][:300] for line in log_text.splitlines()
                         if any(w in line for w in ACCOUNTING_WORDS)][-12:]
    return json.dumps(out, default=str)


ACCOUNTING_WORDS = ("parked and QEMU", "throttled", "stopped before netpass", "phase=", "QEMU took")


def all_reached_the_guest(res: dict[str, Any]) -> bool:
    """Every probe reached the guest (its own InEchos counter), and the only
    replies the peer misses are ones the guest itself failed to send (its
    Icmp OutErrors: a burst fills its ICMP socket's send buffer)."""
    return res["guest_in_echos"] == res["sent"] and res["lost"] == res["guest_icmp_out_errors"]


def assert_all_reached_the_guest(res: dict[str, Any]) -> None:
    assert all_reached_the_guest(res), summary(res)


def assert_zero_loss(res: dict[str, Any]) -> None:
    """Nothing lost that netpass answers for: every probe reached the guest,
    or the only ones missing are what the VM lost by itself outside the
    session, where the kernel's counters show it (``netpass.lab.losses``):
    while it ran on the source before the park (its own tap's ring full:
    ``tap_ring_overflow``, or its kernel's receive drops), or on the
    destination once it had caught up with the hold (that tap's drops from
    then on).  A VM too slow for its traffic loses those with or without
    netpass; seen only with a core kept busy: a flood (34 probes sent at
    1.8 s with the park at 3.9 s, ``tap_ring_overflow`` 210), and once at
    4,000 probes/s without one (19 probes sent 300 ms before the park,
    ``tap_ring_overflow`` 19).  Nothing may be lost from the park until
    the VM has caught up with the hold."""
    rep = res["report"]
    logs = rep.get("logs")
    if not all_reached_the_guest(res):
        placed = losses.place(res)
        assert placed.in_session == 0, f"{placed.why}: {placed} {res['lost_runs_ms']} {summary(res)}"
    assert res["duplicates"] == 0, (res, logs)
    assert rep["state"] == "done" and rep["destination_status"] == "running"
    assert rep["frames_dropped"] == {}, rep["frames_dropped"]
    assert res["src_status"] in (None, "postmigrate") and res["dst_status"] == "running"
    assert 0 < rep["live_cpu_ms"] <= rep["migrate_cpu_ms"], str(rep)  # (the park or stop came)


PAUSED = dict(rate=2000, switchover_pause_ms=200)


def test_plain_migration_loses_hundreds(guest_image, no_leftovers) -> None:
    """The teeth of the next test: the same migration without netpass."""
    res = run(guest_image, "baseline", **PAUSED)
    assert res["lost"] >= 200, str(res)
    assert res["sent"] - res["guest_in_echos"] >= 200, str(res)  # they never reached the guest


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_netpass_zero_loss_2000pps_200ms(guest_image, no_leftovers, attempt: int) -> None:
    res = run(guest_image, "netpass", **PAUSED)
    assert_zero_loss(res)
    rep = res["report"]
    # What plain migration loses is what netpass carried across.
    assert rep["frames_captured"] >= 0.5 * 2000 * res["downtime_ms"] / 1000, str(rep)
    assert rep["frames_replayed"] + rep["duplicates_suppressed"] == rep["frames_captured"]
    assert rep["bytes_wire"] > 0 and rep["replay_delay_ms"] is not None


LATE = dict(rate=2000, switchover_pause_ms=100, lan_lag_ms=300, kill_source=True)


def test_plain_migration_with_late_lan_loses_more(guest_image, no_leftovers) -> None:
    res = run(guest_image, "baseline", **LATE)
    assert res["lost"] >= 0.5 * 2000 * (res["downtime_ms"] + 300) / 1000, str(res)


def test_netpass_late_lan_and_killed_source_zero_loss(guest_image, no_leftovers) -> None:
    """The LAN keeps sending to the source 300 ms after the resume and the
    source QEMU is killed at completion: netpass keeps the tap alive and
    catches the tail."""
    res = run(guest_image, "netpass", **LATE)
    assert_zero_loss(res)
    assert res["src_status"] is None  # the source QEMU was killed
    assert res["report"]["frames_after_resume"] > 0.5 * 2000 * 0.3


# The burst goes out as fast as the peer can send it (chunks 0.25 ms apart):
# paced over 50 ms, it overflowed the tap's ring by 0, 22 and 2,820 frames in
# three runs (a fresh-clone CI failed on a run with 0, its premise gone); at
# 10 ms by 6,864-9,644 in three. Either way it takes the peer ~150-250 ms.
BURST = dict(rate=2000, switchover_pause_ms=500, burst_frames=20_000, burst_ms=10)


def test_plain_migration_loses_a_backlog(guest_image, no_leftovers) -> None:
    """The teeth of the next test: the same burst without netpass."""
    res = run(guest_image, "baseline", **BURST)
    assert res["burst_sent"] == 20_000, str(res)
    assert res["lost"] >= 0.5 * 2000 * res["downtime_ms"] / 1000, str(res)


def test_netpass_carries_a_20000_frame_backlog(guest_image, no_leftovers) -> None:
    """While the source is stopped the peer sends 20,000 frames as fast as
    it can, 20 times what the VM tap's ring holds: they go into netpass's
    parking tap (64 Ki frames) as they come, and all of them across."""
    res = run(guest_image, "netpass", **BURST)
    assert_zero_loss(res)
    rep = res["report"]
    assert res["burst_sent"] == 20_000, summary(res)
    assert rep["frames_replayed"] >= 20_000, summary(res)
    assert rep["nics"][0]["parking_ring_overflow"] == 0, summary(res)
    assert rep["swallowed_account"] == "exact", summary(res)


def test_wrong_token_is_refused_before_anything_happens(guest_image, no_leftovers) -> None:
    other = b"0d9e4f7a1c6b3852e7f0a4d91b6c2e83f5a07d4c9b1e6f28a3c5d70e4b9f1a6c"  # strong, but not the agent's
    res = run(guest_image, "netpass", expect_ok=False, token_override=other, **PAUSED)
    rep = res["report"]
    assert rep["exit_code"] == 3, str(rep)
    assert "authentication failed" in rep["logs"]["migrate"]
    assert "failed authentication" in rep["logs"]["agent"]
    # Nothing happened: the VM runs on the source, the destination still waits.
    assert res["src_status"] == "running" and res["dst_status"] == "inmigrate"
    assert res["lost"] == 0 and res["downtime_ms"] is None


def test_plain_migration_moves_the_vm(guest_image, no_leftovers) -> None:
    """The teeth of the wrong-token test: without netpass the VM moves."""
    res = run(guest_image, "baseline", **PAUSED)
    assert res["src_status"] == "postmigrate" and res["dst_status"] == "running"


def test_cancel_after_stop_gives_frames_back(guest_image, no_leftovers) -> None:
    """The management layer cancels at pre-switchover, with the VM stopped:
    netpass returns what it captured to the source VM.

    Every probe must reach the guest.  Some replies can still go missing: a
    burst of a few hundred echo requests at resume fills the guest's ICMP
    socket send buffer and the guest itself fails to send those replies (its
    Icmp OutErrors).  So the test checks the guest's own counters: every
    probe arrived, and the only missing replies are the guest's send errors."""
    res = run(guest_image, "netpass", expect_ok=False, on_pre_switchover="cancel", rate=2000, switchover_pause_ms=200)
    rep = res["report"]
    assert rep["exit_code"] == 1 and "cancelled" in (rep["error"] or ""), str(rep)
    assert res["src_status"] == "running"
    assert_all_reached_the_guest(res)
    assert res["duplicates"] == 0
    # The teeth: netpass had drained the stopped VM's ring; had it not given
    # those frames back, they would all be lost.
    assert rep["frames_returned_to_source"] >= 0.5 * 2000 * 0.2, str(rep)


def test_best_effort_migrates_without_netpass(guest_image, no_leftovers) -> None:
    """No agent where it should be: --best-effort migrates anyway and says so."""
    res = run(guest_image, "netpass", agent_addr="198.19.0.2:1", migrate_args=("--best-effort",),
              rate=500, switchover_pause_ms=0)
    rep = res["report"]
    assert rep["exit_code"] == 0 and rep["netpass"] is False, str(rep)
    assert any("without netpass" in n for n in rep["notes"])
    assert res["dst_status"] == "running"


def test_unreachable_agent_aborts_before_migrating(guest_image, no_leftovers) -> None:
    res = run(guest_image, "netpass", expect_ok=False, agent_addr="198.19.0.2:1", rate=500,
              switchover_pause_ms=0)
    rep = res["report"]
    assert rep["exit_code"] == 1 and "cannot reach the agent" in (rep["error"] or ""), str(rep)
    assert res["src_status"] == "running" and res["dst_status"] == "inmigrate"


def test_agent_killed_mid_stream_cancels_and_loses_nothing(guest_image, no_leftovers) -> None:
    """The destination agent dies after the stop, while the switchover is held:
    netpass cancels the migration, gives the frames back and says why."""
    res = run(guest_image, "netpass", expect_ok=False, kill_agent_at_stop=True, **PAUSED)
    rep = res["report"]
    assert rep["exit_code"] == 1, str(rep)
    assert "stays on the source" in (rep["error"] or "") and rep["error_kind"] == "MigrationFailed"
    assert res["src_status"] == "running"
    assert_all_reached_the_guest(res)
    assert res["duplicates"] == 0, (res, rep.get("logs"))
    # At least the frames of the 50 ms the lab let cross before the kill.
    assert rep["frames_returned_to_source"] >= 0.5 * 2000 * 0.05, str(rep)


def test_cache_bound_holds_and_reports_exactly(guest_image, no_leftovers) -> None:
    """A cache of 10 kB (about 100 probe frames): past it frames are counted
    and reported, never a crash, and the report's count is the peer's loss."""
    res = run(guest_image, "netpass", migrate_args=("--max-cache-bytes", "10000"), **PAUSED)
    rep = res["report"]
    assert rep["exit_code"] == 0 and rep["bytes_captured"] <= 10000
    dropped = rep["frames_dropped"].get("cache_full", 0)
    assert dropped > 100, str(rep)
    # Frames, not probes: a dropped ARP or IPv6 frame is no probe lost.
    assert 0 <= dropped - res["lost"] <= 3, (res["lost"], rep["frames_dropped"])
