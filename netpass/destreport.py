"""The destination's report: what the agent did for one session, from its
facts (``deststate.DestState``), and what the destination taps' drop
counters say (read here).  Its fields are described in docs/operations.md.
"""

from __future__ import annotations

from typing import Any

from . import links
from .deststate import DestNic, DestState
from .errors import NetpassError


def build(st: DestState, cpu_ms: float) -> dict[str, Any]:
    """The report; ``cpu_ms``: the CPU this agent process spent (user and system)."""
    delay = read_fps = None
    if st.resume_t is not None and st.last_consumed_t is not None:
        delay = round(max(0.0, st.last_consumed_t - st.resume_t) * 1000, 1)
    reads = [dn.first_read_t for dn in st.nics if dn.first_read_t is not None]
    if reads:
        # The rate the VM read a backlog at, from its first read: what
        # bounds the replay delay when netpass keeps the ring fed.
        replayed = sum(dn.replayed for dn in st.nics)
        if st.last_consumed_t is not None and st.last_consumed_t > min(reads) and replayed >= 1000:
            read_fps = round(replayed / (st.last_consumed_t - min(reads)))
    return {
        "session": st.sid,
        "state": st.sm.state.value,
        "batches": st.batches,
        "replay_delay_ms": delay,
        "vm_replay_read_fps": read_fps,
        "agent_cpu_ms": round(cpu_ms, 1),
        "nics": [{"mac": dn.nic.mac, "tap": dn.nic.tap, "replayed": dn.replayed,
                  "duplicates_suppressed": dn.duplicates,
                  "reordered_estimate": dn.reordered,
                  "one_queue_ms": dn.pinned_ms,
                  "dropped": dict(dn.dropped)} for dn in st.nics],
        "reordered_estimate": sum(dn.reordered for dn in st.nics),
        # Of those, broadcast or multicast: a LAN floods them to both hosts,
        # so the VM also got this host's own copy, in order.
        "reordered_group_estimate": sum(min(dn.late_group, dn.reordered) for dn in st.nics),
        "dest_ring_overflow": _ring_overflow(st),
        "dest_ring_overflow_after_hold": _ring_overflow_after_hold(st),
        "replay_refused": sum(dn.ring.refused for dn in st.nics),
        **_hold_report(st),
    }


def _ring_overflow(st: DestState) -> int | None:
    """Frames the destination taps' rings dropped during the session (a
    VM slow to read after its resume, with live frames and ours in the
    ring): not netpass's loss to hide.  The tap's drop counter also
    counts each replay the tap refused (ENOBUFS: a full ring, or a large
    frame the tap could not take before QEMU set its offloads), and
    those frames were kept and sent again: they are not in it."""
    try:
        return sum(_dropped_by(dn, caught_up=True) - dn.tx_dropped0 - dn.ring.refused for dn in st.nics)
    except NetpassError:
        return None


def _ring_overflow_after_hold(st: DestState) -> int | None:
    """What the rings dropped after their holds opened because the VM
    had caught up: the VM's own, as without netpass (a VM that stalls
    for longer than its ring lasts at its traffic's rate)."""
    try:
        return sum(_dropped_by(dn, caught_up=False) - _dropped_by(dn, caught_up=True)
                   for dn in st.nics)
    except NetpassError:
        return None


def _dropped_by(dn: DestNic, caught_up: bool) -> int:
    """The tap's drop counter when its hold opened with the VM caught up
    (``caught_up``), or now."""
    if caught_up and dn.hold is not None and dn.hold.stats.tap_dropped_caught_up is not None:
        return dn.hold.stats.tap_dropped_caught_up
    return links.tx_dropped(dn.nic.tap)


def _hold_report(st: DestState) -> dict[str, Any]:
    holds = [dn.hold.stats for dn in st.nics if dn.hold is not None]
    if not holds:
        return {"strict_ordering": st.strict, "hold_notes": list(st.hold_notes)}
    released = [h.rx_released_t for h in holds if h.rx_released_t is not None]
    hold_ms = None
    if st.resume_t is not None and released:
        hold_ms = round(max(0.0, max(released) - st.resume_t) * 1000, 1)
    caught = [h.rx_caught_up_t for h in holds if h.rx_caught_up_t is not None]
    caught_ms = None
    if st.resume_t is not None and caught and len(caught) == len(holds):
        caught_ms = round(max(0.0, max(caught) - st.resume_t) * 1000, 1)
    tx_ms = None
    tx_rel = [h.tx_released_t for h in holds if h.tx_released_t is not None]
    if st.resume_t is not None and tx_rel:
        tx_ms = round(max(0.0, max(tx_rel) - st.resume_t) * 1000, 1)
    notes = list(st.hold_notes)
    for h in holds:
        notes += h.notes
    return {"strict_ordering": st.strict, "held_tx": sum(h.held_tx for h in holds),
            "held_rx": sum(h.held_rx for h in holds), "hold_ms": hold_ms,
            "hold_caught_up_ms": caught_ms, "hold_tx_ms": tx_ms,
            "hold_timeout": st.hold_timed_out,
            "hold_dropped": sum(h.dropped_rx + h.dropped_tx for h in holds),
            "hold_backlog_dropped": sum(h.backlog_dropped for h in holds),
            "hold_late": any(h.late for h in holds), "hold_notes": notes}
