"""The pace of a release of held live frames toward a VM: pure arithmetic
on what the agent measures (the VM's reading, the tap ring's level).  The
agent's flow control (``destflow.py``) steps it every RELEASE_STEP_S.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_RELEASE_FPS = 2000
# While held frames are released, the pace is decided again every
# RELEASE_STEP_S: the VM's reading rate, corrected to bring the tap's ring
# toward release_aim (an eighth full) within RELEASE_SETTLE_S, never below
# RELEASE_FLOOR_FPS.  The correction adds at most an eighth of the ring per
# RELEASE_SETTLE_S: the agent's loop may stall that long without the pace
# overrunning the ring (a loaded host stalls it tens of milliseconds).
RELEASE_STEP_S = 0.02
RELEASE_SETTLE_S = 0.1
RELEASE_FLOOR_FPS = 200


def release_aim(ring: int) -> int:
    """The frames in the tap's ring a release aims at: an eighth of it.
    The rest is what a VM that stops reading for a moment fills before the
    next step sees it, and with a busy core the VM and the agent stall
    together.  Lab, a 10,000 frames/s flood, the scenario's busy core and
    one more loader: aiming at a quarter, 7 of 16 runs overflowed the ring
    during the release (64-667 frames); at an eighth, 3 of 16 (16-311).  At
    30,000 frames/s without load, an eighth lost 0-136 probes a run (median
    11 of 5; plain QEMU's median was 72)."""
    return ring // 8


def next_release_pace(read_fps: float, level: int, ring: int, pace: float = 0.0) -> float:
    """The pace of a release for the next step.

    The tap's ring is the only buffer between the pace and the VM: a pace
    above what the VM reads fills it, and tun drops what does not fit (seen:
    1,049 frames on a loaded host, with a pace set from the replay's first
    burst and doubled while the hold did not shrink).  So: what the VM read
    lately, plus what brings the ring to :func:`release_aim` within
    RELEASE_SETTLE_S.  A VM that keeps up leaves the ring near empty and
    the pace climbs by that much per RELEASE_SETTLE_S at each step (a
    VM reads only what it is given, so a slower climb left a VM able to read
    20,000 frames/s at 8,700, its hold growing under a 20,000/s flood); one
    that falls behind gets the hold's queue (large) as its buffer instead of
    the ring.  Not a half (a busy host: 221 frames dropped with half a ring
    aimed at), and since then not a quarter either (release_aim); and the
    replay's own feed keeps the ring half full, so the held live frames
    wait until the replay is nearly done.

    Below the aim the VM took all it was given, so the climb starts from
    the current ``pace`` if that is higher than what the VM read: the
    kernel can deliver less than the pace asked (a token bucket whose timer
    fires late on a busy host), and a climb from the reading alone then
    stops inside :func:`repace_needed`'s dead band, short of the traffic's
    own rate.  Lab, 4,000 frames/s with a busy core and one loader: the
    pace stayed at 5,525/s, the VM read some 3,600/s with its ring empty,
    and the hold grew for 3 s, then went in at once (4 of 12 runs, up to
    976 probes lost).  Up to twice the reading: a hold that has nothing
    left passes what arrives, the pace is no limit then, and a pace climbed
    without bound would let the next burst into the ring at once.
    """
    aim = release_aim(ring)
    base = read_fps if level >= aim else max(read_fps, min(pace, 2 * read_fps))
    return max(float(RELEASE_FLOOR_FPS), base + (aim - level) / RELEASE_SETTLE_S)


def repace_needed(rate: float, pace: float, ring: int) -> bool:
    """Whether a release's pace is worth changing (a ``tc qdisc change``):
    past a fifth of it, or past half a step of the climb toward
    :func:`release_aim` (:func:`next_release_pace`), whichever is less.
    With the fifth alone the climb stopped where its step is a fifth of the pace: at
    12,500 frames/s for a 1,000-frame ring, since a VM reads what it is
    given (lab, a 30,000 frames/s flood: the hold grew to some 48,000
    frames and was let go at once, 910-2,958 probes lost where plain QEMU
    lost 35-85)."""
    return abs(pace - rate) > min(0.2 * rate, 0.5 * release_aim(ring) / RELEASE_SETTLE_S)


def vm_reading(step_fps: float, estimate: float | None, level: int, ring: int) -> float:
    """What the VM can read, to pace a release by.

    A step that ends with frames waiting in the tap's ring (an eighth of it
    or more) measured the VM at its limit: that is the estimate, at once,
    however low (a VM that stalls must not be fed a step more at its old
    pace).  A step that ends with the ring nearly empty shows only what the
    VM was given: it can raise the estimate, never lower it.  (Following
    every slower step, as the pace first did, dragged it down to some
    23,000 frames/s on average for a VM that took a 32,000 frames/s flood
    in plain QEMU: each short stall cut the pace, which then climbed back a
    step at a time while the hold grew; lab, 2 of 5 runs.)"""
    if estimate is None or level >= ring // 8:
        return step_fps
    return max(estimate, step_fps)


@dataclass
class Pacing:
    """A paced release of held live frames, from one step to the next."""

    rate: float  # frames/s the hold lets through now
    t: float  # the last step's time
    tx: int  # the tap's reads (tx_packets) then
    estimate: float | None = None  # what the VM can read (vm_reading)
