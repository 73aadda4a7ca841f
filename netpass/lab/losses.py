"""Where a lab run's lost probes fall, and which of them netpass answers for.

A flooded VM on a loaded host can lose frames by itself, with or without
netpass: on the source while it runs, its tap's ring full because it reads
slower than its traffic comes (the report's ``tap_ring_overflow``) or its
own kernel dropping what its NIC took (the guest's receive drops), or on
the destination once it has caught up with the hold and reads live traffic
again (the destination tap's drops from then on).  netpass answers for
everything from the park until the VM has caught up with the hold.

The prober reports each run of consecutive lost probes with its first and
last send time on the lab's clock (``lost_runs_ms``); :func:`place` sorts
them into those three spans.  Pure: it reads a scenario's result dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Placed:
    """A run's lost probes by span.  ``in_session`` is what netpass answers
    for, and also holds every probe that could not be placed with certainty
    (``why`` then says why)."""

    before_park: int
    in_session: int
    after_catch_up: int
    why: str | None = None

    @property
    def vms_own(self) -> int:
        return self.before_park + self.after_catch_up


def place(res: dict[str, Any]) -> Placed:
    """Sort ``res``'s lost probes (a netpass run's result) into the spans.

    A probe counts as the VM's own only when its whole run of losses lies
    outside the session and a kernel counter shows at least that many
    drops there; anything else is counted in the session."""
    lost = res.get("lost") or 0
    if not lost:
        return Placed(0, 0, 0)
    rep = res.get("report") or {}
    runs = res.get("lost_runs_ms") or []
    if sum(n for _a, _b, n in runs) != lost:
        return Placed(0, lost, 0, "the runs of lost probes do not add up to the loss")
    park = res.get("pause_start_ms")
    if park is None:
        return Placed(0, lost, 0, "no park or stop time")
    before = sum(n for _a, last, n in runs if last < park)
    # Shown by the source tap's drops, or by the guest's own (eth0's receive
    # drops: frames that reached its NIC, dropped by its kernel; a flooded
    # TCG guest drops tens of thousands): before the park, netpass has not
    # touched a frame toward the VM.
    if before > (rep.get("tap_ring_overflow") or 0) + (res.get("guest_rx_dropped") or 0):
        before = 0  # not shown by any counter: not the VM's own
    after = 0
    resume, caught = res.get("dst_resume_ms"), rep.get("hold_caught_up_ms")
    if resume is not None and caught is not None:
        after = sum(n for first, _b, n in runs if first > resume + caught)
        # What the destination tap dropped once the VM had caught up, in the
        # session and after it: the lab's count, less the session's overflow
        # and the replays the tap refused (kept and sent again).
        own = ((res.get("dst_tap_dropped") or 0) - (rep.get("dest_ring_overflow") or 0)
               - (rep.get("dest_replay_refused") or 0))
        if after > own:
            after = 0
    why = None if before + after == lost else "lost between the park and the VM's catching up"
    return Placed(before, lost - before - after, after, why)
