"""Zero loss that holds: the scenarios of the results matrix (docs/results.md),
each against real QEMU migrations, each with a plain twin that must fail.

Every netpass run here must lose nothing, duplicate nothing, and say that
it knew exactly what QEMU swallowed at its stop (it parked the VM's frames
and QEMU read the sacrificial frames before stopping).  The twins run plain
QEMU with the same knobs and must lose what the switchover strands.
"""

from __future__ import annotations

from typing import Any

import pytest

from .test_lab_netpass import assert_zero_loss, run, summary

pytestmark = pytest.mark.lab


def assert_exact(res: dict[str, Any]) -> None:
    rep = res["report"]
    assert rep["stop_path"] == "parked", summary(res)
    assert rep["swallowed_account"] in ("exact", "inferred"), summary(res)
    assert rep["frames_dropped"] == {}, summary(res)


def assert_teeth(res: dict[str, Any], rate: float, extra_ms: float = 0.0) -> None:
    """A plain migration loses at least half of what the switchover strands:
    rate x (QEMU's downtime + whatever else kept frames at the source), and
    at least one probe (a kill at completion has a downtime of a few ms: at
    2,000 probes/s plain QEMU lost 4 in a CI run, 6-115 in the matrix)."""
    assert res["lost"] >= max(1, 0.5 * rate * (res["downtime_ms"] + extra_ms) / 1000), str(res)
    assert res["sent"] - res["guest_in_echos"] >= 0.5 * res["lost"], str(res)  # they never reached the guest


# -- a kill the moment QEMU completes, with no pause: what management layers do ----------------

KILL = dict(rate=2000, switchover_pause_ms=0, kill_source=True)


def test_plain_fast_kill_loses(guest_image, no_leftovers) -> None:
    res = run(guest_image, "baseline", **KILL)
    assert res["lost"] >= 5, str(res)  # the switchover and the LAN's learning: ~10-30 ms of probes


def test_netpass_fast_kill_zero_loss(guest_image, no_leftovers) -> None:
    """The source QEMU is SIGKILLed the moment query-migrate says completed:
    the parked frames are netpass's already, and its fds keep the tap."""
    res = run(guest_image, "netpass", **KILL)
    assert_zero_loss(res)
    assert_exact(res)
    assert res["src_status"] is None  # killed


# -- multi-queue NICs -----------------------------------------------------------------------

def test_plain_two_queues_loses(guest_image, no_leftovers) -> None:
    assert_teeth(run(guest_image, "baseline", queues=2, rate=2000, switchover_pause_ms=200), 2000)


@pytest.mark.parametrize("queues", [2, 4])
def test_netpass_multi_queue_zero_loss(guest_image, no_leftovers, queues: int) -> None:
    """A sacrificial frame per queue (found on a throw-away tap with as many
    queues): every queue's reader is verified free before QEMU stops."""
    res = run(guest_image, "netpass", queues=queues, rate=2000, switchover_pause_ms=200)
    assert_zero_loss(res)
    assert_exact(res)
    assert res["report"]["nics"][0]["queues"] == queues, summary(res)


# -- big frames -----------------------------------------------------------------------------

BIG = dict(rate=2000, switchover_pause_ms=200, frame_size=1442)


def test_plain_big_frames_lose(guest_image, no_leftovers) -> None:
    assert_teeth(run(guest_image, "baseline", **BIG), 2000)


def test_netpass_big_frames_zero_loss(guest_image, no_leftovers) -> None:
    res = run(guest_image, "netpass", **BIG)
    assert_zero_loss(res)
    assert_exact(res)
    assert res["report"]["bytes_captured"] >= 1400 * res["report"]["frames_captured"] * 0.9, summary(res)


# -- a TCP flow -----------------------------------------------------------------------------

TCP = dict(proto="tcp", tcp_rate_mbit=20.0, switchover_pause_ms=200)


def test_plain_tcp_flow_retransmits(guest_image, no_leftovers) -> None:
    """Plain QEMU: the segments sent during the switchover are lost, and TCP
    retransmits them (dozens of segments at 20 Mbit/s)."""
    res = run(guest_image, "baseline", **TCP)
    assert res["retransmits"] >= 10, str(res)


def assert_tcp_stall(res: dict[str, Any], allowance_ms: float) -> None:
    """At most one retransmission, the guest's own answer time after its
    resume (``guest_ack_lag_ms``) within 200 ms, and the rest of the stall,
    netpass's share, within the network's pause and ``allowance_ms``."""
    tcp = {k: res.get(k) for k in ("stall_ms", "network_pause_ms", "guest_ack_lag_ms", "retransmits",
                                   "bytes_retrans", "dsack_dups", "stall_start_ms", "pause_start_ms",
                                   "dst_resume_ms")}
    lag = res["guest_ack_lag_ms"]
    assert res["retransmits"] <= 1, (tcp, summary(res))
    assert lag is not None and lag <= 200, (tcp, summary(res))
    assert res["stall_ms"] - max(lag, 0) <= res["network_pause_ms"] + allowance_ms, (tcp, summary(res))


def test_netpass_tcp_flow_stalls_only_for_the_pause(guest_image, no_leftovers) -> None:
    """With netpass no segment is lost: at most the one retransmission a pause
    longer than the sender's RTO (200 ms) fires by itself, and netpass's share
    of the flow's stall is no more than the network's pause and 50 ms.

    The stall ends when the sender sees the guest acknowledge the segments
    netpass replayed.  Its last part, from the moment the destination VM holds
    them (resume plus ``replay_delay_ms``) to that acknowledgement, is the
    guest's own answer time (``guest_ack_lag_ms``): 24-49 ms unloaded (3 runs)
    and 35-90 ms with a core kept busy (10 runs), in the lab's TCG guest;
    plain QEMU's guest was as slow to answer its first segment after a resume
    (13-74 ms, busy, 4 runs).
    That part is bounded apart, by 200 ms."""
    res = run(guest_image, "netpass", **TCP)
    rep = res["report"]
    assert rep["exit_code"] == 0 and rep["frames_dropped"] == {}, summary(res)
    assert_exact(res)
    assert_tcp_stall(res, 50.0)
    assert rep["dest_ring_overflow"] == 0, summary(res)  # the tap's refusals of GSO replays are not overflow


# -- a flood the VM can absorb --------------------------------------------------------------

FLOOD = dict(rate=2000, switchover_pause_ms=200, flood_pps=10_000, max_bandwidth_mib=40)


def test_plain_flood_loses(guest_image, no_leftovers) -> None:
    assert_teeth(run(guest_image, "baseline", **FLOOD), 2000)


def test_netpass_flood_zero_loss_and_no_ring_overflow(guest_image, no_leftovers) -> None:
    """10,000 frames/s to the VM all along and a migration bandwidth-limited to
    40 MiB/s: the backlog and the live frames wait in the destination's
    hold, released as fast as the VM reads, never into a full ring."""
    res = run(guest_image, "netpass", **FLOOD)
    assert_zero_loss(res)
    assert_exact(res)
    assert res["report"]["dest_ring_overflow"] == 0, summary(res)


def test_plain_flood_with_a_busy_core_loses(guest_image, no_leftovers) -> None:
    assert_teeth(run(guest_image, "baseline", busy_core=True, **FLOOD), 2000)


def test_netpass_flood_with_a_busy_core_zero_loss(guest_image, no_leftovers) -> None:
    """The flood, and a core kept busy: the VM stalls for tens of ms at a
    time.  Released on top of the replay, the live frames overflowed its
    ring (5 and 27 probes lost in 2 of 9 runs, 53 in a fresh-clone CI
    with a busy core); they now follow the replay."""
    res = run(guest_image, "netpass", busy_core=True, **FLOOD)
    assert_zero_loss(res)
    assert_exact(res)
    assert res["report"]["dest_ring_overflow"] == 0, summary(res)


# -- a busy core ----------------------------------------------------------------------------

BUSY = dict(rate=2000, switchover_pause_ms=200, busy_core=True)


def test_plain_busy_core_loses(guest_image, no_leftovers) -> None:
    assert_teeth(run(guest_image, "baseline", **BUSY), 2000)


def test_netpass_busy_core_zero_loss(guest_image, no_leftovers) -> None:
    res = run(guest_image, "netpass", **BUSY)
    assert_zero_loss(res)
    assert_exact(res)


# -- a stop netpass did not see coming: the fallback says what it lost ------------------------

@pytest.mark.parametrize("queues", [1, 2])
def test_an_external_stop_loses_nothing(guest_image, no_leftovers, queues: int) -> None:
    """A management layer stops the source VM itself, mid-migration: netpass
    parks at once and drains what the ring still holds, and the frame
    QEMU's reader took at the stop comes from the shadow ring."""
    res = run(guest_image, "netpass", rate=2000, switchover_pause_ms=0, stopper="external", queues=queues)
    rep = res["report"]
    assert rep["exit_code"] == 0 and rep["stop_path"] == "unforeseen", summary(res)
    assert rep["swallowed_account"] == "inferred", summary(res)
    assert_zero_loss(res)
    assert rep["frames_dropped"] == {}, summary(res)


def test_plain_external_stop_loses(guest_image, no_leftovers) -> None:
    """The teeth of the test above: plain QEMU loses what reaches the source
    from the external stop (at a third of the RAM left) to the destination's
    resume.  (A fixed 50 failed a busy-core CI: 47 lost, the rest of the RAM
    crossing in some 25 ms.)"""
    res = run(guest_image, "baseline", rate=2000, switchover_pause_ms=0, stopper="external")
    pause = res["network_pause_ms"]
    assert pause is not None and res["lost"] >= max(1, 0.5 * 2000 * pause / 1000), \
        {k: res.get(k) for k in ("lost", "sent", "network_pause_ms", "downtime_ms", "guest_in_echos")}


# -- QEMU's own stop, unforeseen: the frame it drops there, told by the guest's used ring -------

# netpass's endgame off: QEMU's migration stops the VM before netpass parks.
# Probes and a flood the guest drops: frames of two sizes, as real traffic
# has (with one size the used ring cannot tell, and netpass says so).
def assert_none_lost_at_the_stop(res: dict[str, Any]) -> None:
    """Whatever the counters say of the VM's own losses: none sent from just
    before its stop to the destination's resume.  (A TCG guest on the
    destination may stop reading for a while later on, its ring then
    overflowing: 72 probes sent 860 ms after the resume, once in 14 lab
    runs; the VM's own, after the hold had caught up.)"""
    stop, resume = res["src_stop_ms"], res["dst_resume_ms"] or float("inf")
    assert not [r for r in res["lost_runs_ms"] if r[1] >= stop - 20 and r[0] <= resume], summary(res)


def assert_own_stop_settled(res: dict[str, Any]) -> None:
    """QEMU's own stop came unforeseen, netpass settled what its readers
    took, and nothing was lost."""
    rep = res["report"]
    assert rep["exit_code"] == 0 and rep["stop_path"] == "unforeseen", summary(res)
    settle = [line for line in rep["logs"]["migrate"].splitlines() if "srcsettle" in line]
    assert rep["swallowed_account"] == "inferred", (summary(res), settle)
    assert_zero_loss(res)
    assert_none_lost_at_the_stop(res)


OWN_STOP = dict(rate=4000, switchover_pause_ms=200, flood_pps=1000, endgame=False)


def test_plain_own_stop_loses(guest_image, no_leftovers) -> None:
    assert_teeth(run(guest_image, "baseline", **OWN_STOP), 4000)


def test_qemus_own_stop_unforeseen_loses_nothing(guest_image, no_leftovers) -> None:
    """QEMU's tap reader takes a frame while its migration thread stops the
    vCPUs, and QEMU drops it at the stop (before this: one probe lost in 18
    of 20 lab runs at 4,000 probes/s, docs/results.md).  After the stop
    netpass reads the lengths QEMU wrote into the guest's last receive
    buffers: they end one frame before the last QEMU read when it dropped
    one, and netpass then sends that frame on from the shadow ring."""
    assert_own_stop_settled(run(guest_image, "netpass", **OWN_STOP))


OWN_STOP_ONE_SIZE = dict(rate=4000, switchover_pause_ms=200, endgame=False)  # probes alone: one size


def test_plain_own_stop_with_frames_of_one_size_loses(guest_image, no_leftovers) -> None:
    assert_teeth(run(guest_image, "baseline", **OWN_STOP_ONE_SIZE), 4000)


def test_qemus_own_stop_with_frames_of_one_size_loses_nothing(guest_image, no_leftovers) -> None:
    """As above, with frames of one size only: the lengths in the used ring
    fit both endings, so netpass reads the first bytes of the guest's last
    buffer (its descriptor's address, from guest memory) and finds which of
    the two frames it holds (before this: one probe lost in 18 of 20 lab
    runs, `unknown`)."""
    assert_own_stop_settled(run(guest_image, "netpass", **OWN_STOP_ONE_SIZE))
