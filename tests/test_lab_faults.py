"""The fault matrix, in the lab: each fault either keeps every frame that could
be kept or reports how many were lost (never fewer than the guest missed),
says truly where the VM is, and leaves nothing behind on either host.

The lab's own count of what was lost toward the VM is the probes sent less
those the guest's kernel received (its InEchos, summed over both hosts).
"""

from __future__ import annotations

from typing import Any

import pytest

from .test_lab_netpass import PAUSED, assert_all_reached_the_guest, run, summary

pytestmark = pytest.mark.lab

# A longer migration (QEMU's max-bandwidth, MiB/s): the fault lands in it.
SLOW = dict(rate=1000, switchover_pause_ms=0, max_bandwidth_mib=10)


def requests_lost(res: dict[str, Any]) -> int:
    return int(res["sent"]) - int(res["guest_in_echos"])


def assert_nothing_left(res: dict[str, Any]) -> None:
    # (with the agent's log: what it did last is what left something)
    agent_log = ((res.get("report") or {}).get("logs") or {}).get("agent", "")[-4000:]
    assert res["src_leftovers"] == [], summary(res) + str(res["src_leftovers"])
    assert res["dst_leftovers"] == [], summary(res) + str(res["dst_leftovers"]) + "\nagent log:\n" + agent_log


def assert_moved_and_counted(res: dict[str, Any], silent: bool = False) -> None:
    """The VM moved; netpass says so, and counts at least what the guest missed.

    After a silent cut the source cannot know which frames it sent reached
    the agent (which delivers what it has): it counts them all, and says
    how many of them never left; those, at least, the guest missed."""
    rep = res["report"]
    assert res["dst_status"] == "running", summary(res)
    assert rep["exit_code"] == 4 and rep["error_kind"] == "FramesLost", summary(res)
    assert "stays on the source" not in rep["error"] and "runs on the destination" in rep["error"]
    counted = rep["frames_dropped"].get("channel_lost", 0)
    # Frames, not probes: an ARP or IPv6 frame lost is no probe lost; and
    # what the agent put into a ring but had not yet reported is counted
    # lost: under 32 frames, or its last 20 ms at a slow feed (40 probes).
    if silent:
        unsent = rep["channel_unsent"]
        assert unsent <= requests_lost(res) + 40 and requests_lost(res) <= counted, \
            (unsent, counted, summary(res))
    else:
        assert requests_lost(res) <= counted <= requests_lost(res) + 40, (counted, summary(res))


def test_agent_killed_at_the_stop_without_a_pause(guest_image, no_leftovers) -> None:
    """QEMU completes at once: too late to cancel.  What the agent had put
    into the VM's ring survives it; the rest is counted."""
    res = run(guest_image, "netpass", expect_ok=False, kill_agent_at_stop=True, rate=2000,
              switchover_pause_ms=0, lan_lag_ms=200)
    rep = res["report"]
    if res["src_status"] == "running":  # cancelled in time after all: everything given back
        assert rep["exit_code"] == 1 and "stays on the source" in rep["error"], summary(res)
        assert_all_reached_the_guest(res)
    else:
        assert_moved_and_counted(res)
    assert_nothing_left(res)


def test_agent_killed_after_completion(guest_image, no_leftovers) -> None:
    res = run(guest_image, "netpass", expect_ok=False, kill_agent_after_resume_ms=50, lan_lag_ms=300, **PAUSED)
    assert_moved_and_counted(res)
    assert requests_lost(res) > 0, "the LAN's late frames should have had nowhere to go: " + summary(res)
    assert_nothing_left(res)


def test_channel_cut_silently_before_completion(guest_image, no_leftovers) -> None:
    """netpass sees the silence within 5 s, cancels, and the VM stays, with
    every frame; the agent ends its session when its QEMU gives up."""
    res = run(guest_image, "netpass", expect_ok=False, fault="cut-before-completion", **SLOW)
    rep = res["report"]
    assert rep["exit_code"] == 1 and "silent" in rep["error"] and "stays on the source" in rep["error"], \
        summary(res)
    assert res["src_status"] == "running"
    assert_all_reached_the_guest(res)
    assert_nothing_left(res)


def test_channel_cut_silently_after_completion(guest_image, no_leftovers) -> None:
    """The LAN still sends to the source after the resume; those frames
    cannot cross: counted.  The agent, alone, delivers what it has."""
    res = run(guest_image, "netpass", expect_ok=False, fault="cut-after-completion", lan_lag_ms=300, **PAUSED)
    assert_moved_and_counted(res, silent=True)
    assert "silent" in res["report"]["error"]
    assert "delivering what the session holds" in res["report"]["logs"]["agent"]
    assert_nothing_left(res)


def test_destination_qemu_killed_during_the_replay(guest_image, no_leftovers) -> None:
    res = run(guest_image, "netpass", expect_ok=False, fault="dst-qemu-killed", lan_lag_ms=300, **PAUSED)
    rep = res["report"]
    assert rep["exit_code"] == 1 and res["dst_status"] is None, summary(res)
    assert "destination QEMU" in rep["error"] and "runs on neither host" in rep["error"], summary(res)
    assert_nothing_left(res)


def test_migrate_sigkilled_at_the_stop_leaves_nothing(guest_image, no_leftovers) -> None:
    """Its guard removes the parking rule and the pinned MAC, and gives QEMU
    its parameters back; the migration completes; the agent, alone, delivers
    what it received."""
    res = run(guest_image, "netpass", expect_ok=False, fault="migrate-sigkill-at-stop", **PAUSED)
    assert res["report"]["exit_code"] == -9, summary(res)
    assert res["dst_status"] == "running", summary(res)
    assert_nothing_left(res)


def test_migrate_sigkilled_midway_gives_qemu_back_its_parameters(guest_image, no_leftovers) -> None:
    """Killed during the RAM phase: the migration goes on as a plain one and
    completes (netpass's downtime-limit of 0 alone would never converge).
    A slow migration on a busy core brings QEMU 7.2's TCG guest crash
    after the resume often (a corrupted slab freelist): plain QEMU, no
    netpass, 2 of 8 such runs; this test's run 2 of 11.  A fresh-clone CI
    met it twice in a row.  What this test claims does not involve the
    guest after the resume, so such a crash is only warned of (the
    destination QEMU then exits, and the source's state says the migration
    completed)."""
    res = run(guest_image, "netpass", expect_ok=False, guest_crash_ok=True, fault="migrate-sigkill-midway", **SLOW)
    assert res["report"]["exit_code"] == -9, summary(res)
    assert res["src_status"] == "postmigrate", summary(res)
    assert res["dst_status"] == "running" or res["dst_guest_fault"], summary(res)
    assert_nothing_left(res)


def test_migrate_sigtermed_midway_cancels_and_keeps_everything(guest_image, no_leftovers) -> None:
    res = run(guest_image, "netpass", expect_ok=False, fault="migrate-sigterm-midway", **SLOW)
    rep = res["report"]
    assert rep["exit_code"] == 130, summary(res)
    assert res["src_status"] == "running", summary(res)
    assert_all_reached_the_guest(res)
    assert_nothing_left(res)


def test_a_real_migration_succeeds_during_a_preauth_attack(guest_image, no_leftovers) -> None:
    """200 connections without the token (32 MiB length prefixes, nested
    JSON, silence) held open at the agent from before the migration to its
    end: the real client still authenticates, and nothing is lost."""
    from .test_lab_netpass import assert_zero_loss

    res = run(guest_image, "netpass", fault="preauth-attack", **PAUSED)
    attack = res["report"]["attack"]
    assert attack.get("opened", 0) + attack.get("refused", 0) == 200, attack
    # Over the caps (8 per address, 64 in all), or oversized, or unparsable:
    # closed by the agent at once; the silent ones at the handshake deadline.
    assert attack.get("closed_by_agent", 0) >= 200 - 4 * 8, attack
    assert_zero_loss(res)
    assert_nothing_left(res)
