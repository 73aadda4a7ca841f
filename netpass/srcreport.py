"""The source's report: one JSON object that says what a session did, from
its facts (``srcstate.SourceState``).  Pure: it reads, and changes nothing.
Its fields are described in docs/operations.md.
"""

from __future__ import annotations

from typing import Any, Protocol

from .srcstate import SourceState


class LinkFacts(Protocol):
    """What the report reads of the channel (``channel.Channel`` has it)."""

    bytes_out: int
    link_rate: float | None
    peer_limited: float | None


def build(st: SourceState, error: BaseException | None, link: LinkFacts | None,
          cpu_ms: float, live_cpu_ms: float | None = None) -> dict[str, Any]:
    """The report; ``cpu_ms``: the CPU this process spent on the session,
    ``live_cpu_ms`` the part of it before the park or stop (None: neither came)."""
    per_nic, dropped, replayed = _nics(st)
    unsent: int | None = None
    if st.completed and st.dest_report == {} and st.netpass_active:
        # The agent is gone: what it confirmed in the VM's rings is in
        # the VM, the rest of what we captured is lost, and we say so.
        replayed = st.agent_fed
        # (Of those, the ones that never left this host are surely lost;
        # the rest reached the agent or not: a silent cut cannot say.)
        unsent = max(0, st.captured() - st.shipped)
        unconfirmed = st.unconfirmed()
        if unconfirmed:
            dropped["channel_lost"] = dropped.get("channel_lost", 0) + unconfirmed
    return {
        "session": st.sid,
        "state": st.phases.phase.value,
        "netpass": st.netpass_active,
        "error": str(error) if error else None,
        "error_kind": type(error).__name__ if error else None,
        "stop_path": st.stop_path(),
        "swallowed_account": st.swallowed_account(),
        "frames_captured": st.captured(),
        "frames_recovered_from_shadow": sum(sn.recovered for sn in st.nics),
        "frames_replayed": replayed,
        "frames_returned_to_source": st.returned_to_source,
        "straggler_frames": st.straggler_frames,
        "duplicates_suppressed": sum(int(n.get("duplicates_suppressed", 0))
                                     for n in st.dest_report.get("nics", [])),
        "frames_dropped": dropped,
        "channel_unsent": unsent,
        "tap_ring_overflow": (sum(sn.ring_overflow for sn in st.nics)
                              if all(sn.ring_overflow is not None for sn in st.nics) else None),
        "bytes_captured": sum(sn.bytes_captured for sn in st.nics),
        **_link(st, link),
        **_times(st),
        "migrate_cpu_ms": round(cpu_ms, 1),
        "live_cpu_ms": None if live_cpu_ms is None else round(live_cpu_ms, 1),
        **_destination(st),
        "nics": per_nic,
        "notes": st.notes + list(st.dest_report.get("hold_notes", [])),
        "states": [s for _, s in st.phases.history],
    }


def _nics(st: SourceState) -> tuple[list[dict[str, Any]], dict[str, int], int]:
    """Each NIC's part (with what the agent said of it), every drop by its
    reason, and the frames the agent replayed."""
    dest_nics = {n["mac"]: n for n in st.dest_report.get("nics", [])}
    per_nic = []
    dropped: dict[str, int] = {}
    replayed_total = 0
    for sn in st.nics:
        d = dest_nics.get(sn.nic.mac, {})
        nic_dropped = dict(sn.dropped)
        for k, v in d.get("dropped", {}).items():
            nic_dropped[k] = nic_dropped.get(k, 0) + v
        replayed = int(d.get("replayed", 0))
        replayed_total += replayed
        for k, v in nic_dropped.items():
            dropped[k] = dropped.get(k, 0) + v
        per_nic.append({"mac": sn.nic.mac, "tap": sn.nic.tap, "parking_tap": sn.park.name,
                        "queues": len(sn.sacrificial),
                        "frames_captured": sn.captured, "bytes_captured": sn.bytes_captured,
                        "frames_replayed": replayed,
                        "duplicates_suppressed": int(d.get("duplicates_suppressed", 0)),
                        "own_frames_ignored": sn.own_frames,
                        "vm_ring_drained": sn.vm_ring_drained,
                        "tap_ring_overflow": sn.ring_overflow,
                        "parking_ring_overflow": sn.park_overflow,
                        "qemu_held_at_its_stop": sn.qemu_held,
                        "recovered_from_shadow": sn.recovered,
                        "rx_queues_without_buffer_at_stop": (sum(sn.starved.values())
                                                             if sn.starved else None),
                        "shadow_dropped": sum(r.dropped for r in sn.shadows),
                        "frames_dropped": nic_dropped})
    return per_nic, dropped, replayed_total


def _link(st: SourceState, link: LinkFacts | None) -> dict[str, Any]:
    return {
        "bytes_wire": link.bytes_out if link else 0,
        "batches": st.seq,
        "batches_compressed": st.batches_compressed,
        "compress": st.o.compress,
        "link_rate_mbit": round(link.link_rate * 8 / 1e6, 1) if link and link.link_rate else None,
        "link_peer_limited": (round(link.peer_limited, 2)
                              if link and link.peer_limited is not None else None),
    }


def _times(st: SourceState) -> dict[str, Any]:
    info, eg = st.migration_info, st.endgame
    late_frames, last_late_ms = st.after_resume()
    return {
        "downtime_ms": info.get("downtime"),
        "total_time_ms": info.get("total-time"),
        "park_to_stop_ms": st.ms(st.stop_t, st.parked_t) if st.parked_t and st.stop_t else None,
        "verified_to_stop_ms": (st.ms(st.stop_t, st.verified_t)
                                if st.verified_t and st.stop_t else None),
        "stop_to_resume_ms": st.ms(st.resumed_t, st.stop_t) if st.resumed_t and st.stop_t else None,
        "network_pause_ms": st.network_pause_ms(),
        "arm_steps_ms": dict(st.arm_steps),
        "times_wall": {k: round(st.t0_wall + (t - st.t0), 6) for k, t in
                       (("parked", st.parked_t), ("verified", st.verified_t), ("stopped", st.stop_t),
                        ("resumed_seen", st.resumed_t)) if t is not None},
        "endgame": ({"throttled_at_remaining": eg.throttle_remaining,
                     "throttle_to_park_ms": st.ms(st.parked_t, eg.throttled_t)
                     if eg.throttled_t and st.parked_t else None,
                     "lead_ms": round(eg.lead_s * 1000, 2),
                     "limited_to": eg.limited_to,
                     "held_throughout": eg.held_throughout,
                     "missed_windows": eg.missed_windows(st.stop_t) if st.stop_t else None}
                    if eg is not None else None),
        "frames_after_resume": late_frames,
        "last_frame_after_resume_ms": last_late_ms,
    }


def _destination(st: SourceState) -> dict[str, Any]:
    """What the agent reported, under the report's names."""
    dest = st.dest_report
    return {
        "replay_delay_ms": dest.get("replay_delay_ms"),
        "vm_replay_read_fps": dest.get("vm_replay_read_fps"),
        "agent_cpu_ms": dest.get("agent_cpu_ms"),
        "destination_status": st.dest_status,
        "reordered_estimate": dest.get("reordered_estimate"),
        "reordered_group_estimate": dest.get("reordered_group_estimate"),
        "dest_ring_overflow": dest.get("dest_ring_overflow"),
        "dest_ring_overflow_after_hold": dest.get("dest_ring_overflow_after_hold"),
        "dest_replay_refused": dest.get("replay_refused"),
        # Multiqueue: how long every frame toward the VM went to its queue 0 (destflow.Holds.pin_queue).
        "dest_one_queue_ms": [n.get("one_queue_ms") for n in dest.get("nics", [])
                              if isinstance(n, dict)] or None,
        **({"pcap": st.o.save_pcap, "pcap_frames": st.pcap_written} if st.o.save_pcap else {}),
        "strict_ordering": st.o.strict_ordering,
        **{k: dest.get(k) for k in ("held_tx", "held_rx", "hold_ms", "hold_tx_ms", "hold_timeout",
                                    "hold_dropped", "hold_backlog_dropped", "hold_late",
                                    "hold_caught_up_ms")},
    }
