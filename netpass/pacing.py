"""The windows of a release of held live frames toward a VM: pure
arithmetic on what the agent measures (the tap ring's level, the hold's
backlog, what it let through since its last grant).  The agent's flow
control (``destflow.py``) steps it every RELEASE_STEP_S.

A release is a window, not a pace.  At each step the hold is allowed what
brings the tap's ring up to :func:`window_top`, and nothing more until the
next grant: a VM that stops reading, or an agent that is not scheduled,
can then fill the ring only up to that top, never past it.  A pace in
frames per second (what the agent did first) keeps letting frames in while
both stall: with a 10,000 frames/s flood and a core kept busy, a step that
came 104 ms late instead of 20 had let 911 frames overflow a 1,000-frame
ring (lab trace; 2 of 12 runs overflowed, 6 of 9 before the hold's frame
size left its own primers out).
"""

from __future__ import annotations

from dataclasses import dataclass

# How often a release is looked at, and given a new window if it used the
# last: its most is window_top(ring) frames a step (625 of a 1,000-frame
# ring every 10 ms, 62,500 frames/s).  A grant is a ``tc qdisc change``
# (some 2 ms of CPU), made only when the last is used (grant_needed).
RELEASE_STEP_S = 0.01
# How often, at most, a hold with nothing waiting is asked again whether
# frames wait (ask_hold).
WINDOW_RECHECK_S = 0.05


def window_top(ring: int) -> int:
    """The most frames a release may have in the tap's ring: five eighths
    of it.  The rest covers what a window's byte count lets through beyond
    its frames (a window is bytes in the kernel, from an average frame
    size: smaller frames than the average pass more; and never fewer bytes
    than the largest frame) and frames that left the hold between the
    ring's reading and the grant."""
    return ring * 5 // 8


def release_window(level: int, ring: int) -> int:
    """Frames the hold may let into a ring holding ``level`` until the next grant."""
    return max(0, window_top(ring) - level)


def window_min(ring: int) -> int:
    """The least window worth a ``tc`` change: a 32nd of the ring."""
    return max(1, ring // 32)


def grant_needed(window: int, ring: int, passed: int, granted: int) -> bool:
    """Whether to grant ``window`` now: one worth a change (window_min),
    once half of the last grant (``granted``) has ``passed`` into the ring.
    A grant not half used keeps letting arriving frames straight in, and a
    new one would only reset it; the caller asks the hold whether frames
    wait behind one that is not (frames larger than the window's average
    use its bytes up sooner: WINDOW_RECHECK_S)."""
    return window >= window_min(ring) and 2 * passed >= granted


@dataclass
class Window:
    """A windowed release of held live frames, from one grant to the next."""

    granted: int  # frames the last grant allowed
    entered0: int  # the frames that had entered the tap then (DestNic.live_enqueued)
    entered_step: int = 0  # ... at the last step
    step_t: float = 0.0  # when the last step began
    asked_t: float = 0.0  # when the hold was last asked whether frames wait
    idle: bool = False  # it said none did


def ask_hold(w: Window, entered: int, now: float) -> bool:
    """Whether to ask the hold (a netlink read) if frames wait behind a
    window not half used: its frames may be larger than the window counts
    them (tbf_allow), and then its bytes are spent.  At once if nothing
    entered the tap in the last step, unless the last answer was that
    nothing waits; else every WINDOW_RECHECK_S."""
    if entered == w.entered_step and not w.idle:
        return True
    return now - w.asked_t >= WINDOW_RECHECK_S
