"""When to park the VM's incoming frames: the end of a migration, planned
from QEMU's own counters.  Pure: no asyncio, no QMP, no kernel.

The source side must have the VM's frames parked (and QEMU's last reads
verified, see ``source.py``) *before* QEMU stops the VM, or QEMU reads one
more frame at its stop and never delivers it.  QEMU gives no warning before
it stops, so netpass makes the moment predictable:

* QEMU's ``downtime-limit`` is 0 for the migration, so QEMU switches over
  only when no RAM at all is left to send (``pending == 0``), never at a
  bitmap sync with RAM left.
* QEMU sends RAM in windows of ``BUFFER_DELAY`` (100 ms): at a window's start
  it sends up to ``max-bandwidth / 10`` bytes, then sleeps until the next.
  A window that starts with at most that much RAM left finishes it and QEMU
  switches over right then.
* When the RAM left fits one window (measured in the quiet time after a
  window's burst), netpass *throttles* the migration (``max-bandwidth`` of
  10 bytes/s: one page a window), so no window can finish it by surprise.
  The windows keep their rhythm, and netpass learns their phase from
  ``transferred``.  Just before the next window starts it parks the frames,
  restores the bandwidth, and that window finishes the RAM: QEMU stops the
  VM a few milliseconds after the park.
* Without a rate limit (``max-bandwidth`` 0, as libvirt sets it), RAM goes
  out continuously; netpass throttles when the RAM left would be gone
  within :data:`HORIZON_S` at the recent pace, which creates the windows.

Zero pages cost 9 bytes on the wire, against 4 KiB: a window can clear far
more RAM than its bytes (lab: one 12.8 MB window cleared 146 MiB).  So the
planner also follows the *mix* of each burst, the RAM it clears per byte it
sends.  When the bytes a burst has left could, at its mix so far, clear the
rest (with a margin: the mix can grow), it throttles QEMU at once and
*probes*: each following window gets half the bytes that all the RAM left
would take were it all zero pages, so no window can finish it.  A window
that clears zero pages halves the rest; one that sends pages that hold data
says the zero run is over, and the operator's bandwidth comes back.  Once
the RAM left is an eighth of a window's bytes, the usual throttle and park
follow.
This costs the migration some windows (100 ms each), never the network a
longer pause: parking instead, with bytes for all the rest (a boost), cost
the lab 10-30 ms more pause in 4 of 5 runs, since most such bursts clear
zero pages and then data.

What this cannot foresee: a burst that clears the rest in less than a
polling interval.  Then QEMU stops the VM without warning, and the source
takes its fallback (``source.py``), which the report names.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

PERIOD_S = 0.1  # QEMU's rate-limit window (BUFFER_DELAY in migration/migration.c)
# A window's first byte after this long without one: its start.  A burst can
# pause for 20 ms under TCG (seen), and QEMU sleeps at least this long
# between bursts unless a burst lasts over 60 ms.
QUIET_S = 0.04
BURST_OVER_S = 0.015  # no byte for this long: the burst has used its window's bytes
# max-bandwidth is divided by 10 per window, and a limit of 0 means none: 10
# bytes/s is the smallest throttle, and lets one page out per window.
THROTTLE_BANDWIDTH = 10
QUOTA_MARGIN = 0.95  # page headers: RAM that fits a window's bytes, with room for them
NEAR_WINDOWS = 4  # poll finely once the RAM left is within this many windows
MIX_ZERO = 1.5  # RAM cleared per wire byte above which a window was mostly zero pages
MIX_MARGIN = 1.5  # a burst's mix can grow as it goes
MIX_MIN_SENT = 8 << 10  # a burst's mix is measured once it sent this many bytes
ALARM_REACH = 32  # a burst of zero pages is watched for within this many windows' bytes of the end
MID_POLL_S = 0.002  # ... by polling this often
ZERO_PAGE_WIRE = 9  # the fewest bytes a page takes on the wire (a zero page's header and fill byte)
PROBE_MIN = 16 << 10  # a probing window's fewest bytes (enough to measure its mix)
PROBE_END = 8  # probing ends with this fraction of a window's bytes of RAM left
MAX_ALARMS = 10  # the probing costs the migration windows: at most this many alarms
HORIZON_S = 0.05  # unlimited bandwidth: throttle when the RAM left goes within this
COARSE_POLL_S = 0.005
FINE_POLL_S = 0.001
DEFAULT_LEAD_S = 0.004  # park + restore, before a window starts (learned, see engaged())
LEAD_SAFETY_S = 0.001
PARK_S = 0.001  # switching the parking on (nft, measured 0.2-0.8 ms)
MAX_LEAD_S = 0.03
MAX_GAP_S = 0.005  # a longer gap between samples is a hiccup, not the polling pace
ACTIVE = ("active", "setup")


class Step(enum.Enum):
    WAIT = "wait"
    THROTTLE = "throttle"  # set max-bandwidth to THROTTLE_BANDWIDTH now
    BANDWIDTH = "bandwidth"  # set max-bandwidth to Endgame.bandwidth now (probing for zero pages)
    ENGAGE = "engage"  # park, restore max-bandwidth, send the sacrificial frames: now
    OVER = "over"  # the migration left 'active' before netpass engaged


class Phase(enum.Enum):
    WATCHING = "watching"
    PROBING = "probing"  # a burst of zero pages could have finished the RAM: windows that cannot
    THROTTLED = "throttled"
    ENGAGED = "engaged"
    OVER = "over"


@dataclass(frozen=True)
class Sample:
    """What one ``query-migrate`` said, and when (monotonic seconds)."""

    t: float
    status: str
    remaining: int | None = None
    transferred: int | None = None


@dataclass
class Window:
    """A window's start lies in (lo, hi]: the samples before and at which
    ``transferred`` first moved after a quiet time; ``sent0`` is what
    ``transferred`` said before it."""

    lo: float
    hi: float
    sent0: int = 0
    rem0: int | None = None  # the RAM left before it


@dataclass
class Endgame:
    max_bandwidth: int  # bytes/s, as QEMU has it (0: no limit)
    lead_s: float = DEFAULT_LEAD_S
    phase: Phase = Phase.WATCHING
    windows: deque[Window] = field(default_factory=lambda: deque(maxlen=8))
    throttled_t: float | None = None
    throttle_remaining: int | None = None
    engaged_t: float | None = None
    planned_start: float | None = None  # the window start the engage aimed at
    _last: Sample | None = None
    _last_move: float | None = None  # last sample at which transferred moved
    _gap: float = 0.0  # between the last two samples
    _pace: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=16))
    _rtts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    bandwidth: int = 0  # what Step.BANDWIDTH sets
    alarms: int = 0  # bursts of zero pages that could have finished the RAM
    _mix_now: float | None = None  # the current window's RAM cleared per wire byte
    _probed_at: float | None = None  # the burst a probing decision was made after

    @property
    def quota(self) -> int | None:
        """RAM bytes one window surely sends, whatever the pages hold."""
        if self.max_bandwidth <= 0:
            return None
        return int(self.max_bandwidth * PERIOD_S * QUOTA_MARGIN)

    # -- observing --------------------------------------------------------------------
    def _observe(self, s: Sample) -> None:
        prev = self._last
        if prev is not None and s.transferred is not None and prev.transferred is not None and \
                s.transferred != prev.transferred:
            if self._last_move is None or s.t - self._last_move >= QUIET_S:
                self.windows.append(Window(lo=prev.t, hi=s.t, sent0=prev.transferred, rem0=prev.remaining))
                self._mix_now = None
            self._last_move = s.t
            w = self.windows[-1] if self.windows else None
            if w is not None and w.rem0 is not None and s.remaining is not None and \
                    s.transferred - w.sent0 >= MIX_MIN_SENT:
                self._mix_now = max(0, w.rem0 - s.remaining) / (s.transferred - w.sent0)
        if s.remaining is not None:
            self._pace.append((s.t, s.remaining))
        if prev is not None:
            self._gap = s.t - prev.t
        self._last = s

    def next_start(self, now: float) -> float | None:
        """The earliest time the next window may start.

        QEMU's migration thread sleeps until 100 ms after its window began
        and starts the next when it wakes, a little late under load (periods
        of 98.8-101.8 ms observed, drifting): only the last start seen says
        where the next one is, and no earlier than 100 ms after it.
        """
        if not self.windows:
            return None
        nxt = self.windows[-1].lo + PERIOD_S
        while nxt <= now:
            nxt += PERIOD_S
        return nxt

    def unlimited_pace(self) -> float | None:
        """RAM bytes per second leaving lately, when there is no rate limit."""
        if len(self._pace) < 2:
            return None
        (t0, r0), (t1, r1) = self._pace[0], self._pace[-1]
        if t1 - t0 < 0.004 or r0 <= r1:
            return None
        return (r0 - r1) / (t1 - t0)

    # -- deciding ---------------------------------------------------------------------
    def feed(self, s: Sample) -> Step:
        """Take one sample; say what to do now."""
        self._observe(s)
        if self.phase in (Phase.ENGAGED, Phase.OVER):
            return Step.WAIT
        if s.status not in ACTIVE:
            self.phase = Phase.OVER
            return Step.OVER
        if s.status != "active" or s.remaining is None:
            return Step.WAIT
        if self.phase is Phase.WATCHING:
            if self._should_throttle(s):
                return self._throttle(s)
            if self._zero_alarm(s):
                self.phase = Phase.PROBING
                self.alarms += 1
                self._probed_at = None
                self.bandwidth = THROTTLE_BANDWIDTH
                return Step.BANDWIDTH
            return Step.WAIT
        if self.phase is Phase.PROBING:
            return self._probe(s)
        # THROTTLED: engage just before the next window, which will finish the
        # RAM: at the last sample before it that leaves the lead (the next
        # sample comes about one polling gap later, and could be too late).
        nxt = self.next_start(s.t)
        margin = max(LEAD_SAFETY_S, min(self._gap, MAX_GAP_S))
        if nxt is not None and s.t >= nxt - self.lead_s - margin and self._phase_known():
            self.phase = Phase.ENGAGED
            self.engaged_t = s.t
            self.planned_start = nxt
            return Step.ENGAGE
        return Step.WAIT

    def _throttle(self, s: Sample) -> Step:
        self.phase = Phase.THROTTLED
        self.throttled_t = s.t
        self.throttle_remaining = s.remaining
        return Step.THROTTLE

    def _burst_over(self, s: Sample) -> bool:
        return self._last_move is None or s.t - self._last_move >= BURST_OVER_S

    def _zero_alarm(self, s: Sample) -> bool:
        """In a burst: could the bytes its window has left, at its mix so
        far, clear the RAM left?"""
        quota, w, mix = self.quota, self.windows[-1] if self.windows else None, self._mix_now
        if quota is None or w is None or mix is None or mix <= MIX_ZERO or self._burst_over(s) or \
                s.transferred is None or s.remaining is None or self.alarms >= MAX_ALARMS:
            return False
        left = int(self.max_bandwidth * PERIOD_S) - (s.transferred - w.sent0)
        return s.remaining <= left * mix * MIX_MARGIN

    def _probe(self, s: Sample) -> Step:
        """Once per burst, after it: the next window's bytes."""
        quota = self.quota
        assert quota is not None and s.remaining is not None
        if not self._burst_over(s) or self._probed_at == self._last_move:
            return Step.WAIT
        self._probed_at = self._last_move
        if s.remaining <= quota // PROBE_END:
            # (the usual end, with little left for the window after the park:
            # the bandwidth is already the throttle's.  Up to a window's bytes
            # left here had the lab's parked window send 3-12 MB: 10-22 ms.)
            return self._throttle(s)
        mix = self._mix_now
        if mix is not None and mix <= MIX_ZERO:
            self.phase = Phase.WATCHING  # pages that hold data: the zero run is over
            self.bandwidth = self.max_bandwidth
            return Step.BANDWIDTH
        budget = max(PROBE_MIN, min(quota, s.remaining // 4096 * ZERO_PAGE_WIRE // 2))
        self.bandwidth = int(budget / PERIOD_S)
        return Step.BANDWIDTH

    def _phase_known(self) -> bool:
        return len(self.windows) >= 1

    def _should_throttle(self, s: Sample) -> bool:
        quota = self.quota
        assert s.remaining is not None
        if quota is not None:
            if self._last_move is None or s.t - self._last_move >= BURST_OVER_S:
                # The burst used its window's bytes: the next window finishes what is left.
                return s.remaining <= quota
            # In the middle of a burst: throttle only if what this window may
            # still send surely finishes the RAM (the race is then near);
            # otherwise let the burst use its bytes, and the last window
            # carry only what it left (a smaller last burst, after the park).
            w = self.windows[-1] if self.windows else None
            if w is None or s.transferred is None:
                return False
            left = int(self.max_bandwidth * PERIOD_S) - (s.transferred - w.sent0)
            return s.remaining + s.remaining // 256 + 4096 <= left
        pace = self.unlimited_pace()
        return pace is not None and s.remaining <= pace * HORIZON_S

    def poll_interval(self) -> float:
        """How long until the next sample: finely near the end."""
        if self.phase is Phase.THROTTLED:
            return FINE_POLL_S
        if self.phase is Phase.PROBING:
            return MID_POLL_S
        last = self._last
        quota = self.quota
        if last is not None and last.remaining is not None:
            if quota is None or last.remaining <= NEAR_WINDOWS * quota:
                return FINE_POLL_S
            if last.remaining <= ALARM_REACH * quota:
                return MID_POLL_S
        return COARSE_POLL_S

    def engaged(self, took_s: float) -> None:
        """How long the park and restore took: the lead for next time."""
        self.lead_s = max(DEFAULT_LEAD_S / 2, 0.7 * self.lead_s + 0.3 * took_s)

    def qmp_answered(self, rtt_s: float) -> None:
        """A QMP round trip, as the source's polling saw it.  The engage takes
        about two (QEMU's main loop reads the sacrificial frames, then
        answers the bandwidth's restore): the lead follows the slow ones, so
        a loaded host starts earlier rather than miss the window (which
        costs a whole window, 100 ms)."""
        self._rtts.append(rtt_s)
        if len(self._rtts) >= 8:
            slow = sorted(self._rtts)[int(0.9 * (len(self._rtts) - 1))]
            self.lead_s = max(self.lead_s, min(MAX_LEAD_S, 2 * slow + PARK_S))

    def missed_windows(self, stop_t: float) -> int:
        """Whole windows between the aimed-at start and the stop (0: on time)."""
        if self.planned_start is None or stop_t <= self.planned_start:
            return 0
        return int((stop_t - self.planned_start) // PERIOD_S)
