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
* When the RAM left fits what one window could clear (its bytes and a
  page more; measured in the quiet time after a window's burst), netpass
  *throttles* the migration (``max-bandwidth`` of 10 bytes/s: one page a
  window), so no window can finish it by surprise.  The windows keep their
  rhythm, and netpass learns their phase from ``transferred``.  Just
  before the next window starts it parks the frames, restores the
  bandwidth (6% over, for the page headers), and that window finishes the
  RAM: QEMU stops the VM a few milliseconds after the park.
* Without a limit that binds (``max-bandwidth`` 0, libvirt's 8 EiB/s, or a
  link slower than the limit), RAM goes out all along.  For the last
  :data:`LIMIT_HORIZON_S` of it at the recent pace, netpass sets a limit at
  half the pace on the wire (``Step.LIMIT``), and the windows come back.
  Should one still not bind, netpass throttles when the RAM left would be
  gone within :data:`HORIZON_S`, which creates them.

Zero pages (9 bytes each on the wire, against 4 KiB) let a window clear far
more RAM than its bytes.  A lab guest's RAM ends in 60-110 MB of them and a
tail of 2-8 MB of data: the window that reaches them clears the zero pages in
8-15 ms and then the tail.  So, during a burst, netpass watches how much RAM
each wire byte clears, polls finely through each burst (and from just
before each window's start) once the RAM left is within some windows' bytes,
and throttles in a run once the RAM left is within a few windows' reach
(without a limit: within what the run could clear before a throttle asked at
the next sample lands, at this host's pace, :meth:`Endgame.zero_run_reach`).
The parked window then carries the rest of the run and the tail, and gets the
bytes to send all of it as data.  Such a sample is throttled even when a
LIMIT (below) is due at it.  Both hold whenever a limit is set, also
right after netpass's own ``LIMIT``, before its windows are seen to bind
(polled finely until then).  The throttle stays capped by that reach:
throttled earlier in a run, a run in the middle of the RAM left tens of MB of
data to the parked window, and a busy lab host held the frames for 605 ms.

What this cannot foresee: a window that clears a run of zero pages and a
short tail behind it within one poll and QMP round trip (polls that come
4 ms late on a loaded host miss some; tests/test_endgame.py models it).
Then QEMU stops the VM without warning, and the source takes its fallback
(``source.py``), which the report names.  Without a limit (libvirt's), on
the page model of tests/test_endgame.py (``SlowLinkQemu``: 18 layouts of
data, a run of zero pages and a tail), none is missed with 2 ms round trips
and polls on time, but 4 of 18 with polls 10 ms late and 11 of 18 with
30 ms round trips; setting the limit earlier (for all the RAM a run of zero
pages could clear within a round trip) did not help (4-12 of 18).  Through
libvirt on a busy host, round trips are that slow: a busy-core CI's
transparent migration stopped unforeseen.  So a migration libvirt started,
held back until netpass is armed, stays throttled to its park when little
RAM is left (:func:`stays_throttled`, ``Endgame.handed_off``): nothing is
raced, and the park lasts while QEMU sends the rest.
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
PAGE = 4096
RELEASE_MARGIN = 1.06  # (>= 1 / QUOTA_MARGIN: page headers, and the page after the limit)
QUOTA_MARGIN = 0.95  # page headers: RAM that fits a window's bytes, with room for them
NEAR_WINDOWS = 4  # poll finely once the RAM left is within this many windows
# A burst clearing this many bytes of RAM per byte on the wire is in a run of
# zero pages (9 bytes each: up to 455); data pages clear about 1.
ZERO_RUN_RATIO = 4.0
MIXED_MARGIN = 1.1  # the next window's pages may hold a little fewer data than the last's
MIXED_MAX = 2.0  # ... and the window's reach grows with the last's RAM per byte up to this
# In a run of zero pages, throttle once the RAM left is within this many
# windows' reach: the window could clear the run and a tail of data behind
# it faster than a poll and a QMP round trip (lab: 60-110 MB of zero pages in
# 8-15 ms, then a tail of 2-8 MB of data in 2-50 ms).  The parked window gets
# bytes for all of it (release_bandwidth), should the rest be data.
ZERO_RUN_WINDOWS = 3
ZERO_RUN_POLL_WINDOWS = 16  # and poll finely in such a run from this far (7 MB/ms seen)
HORIZON_S = 0.05  # unlimited bandwidth: throttle when the RAM left goes within this
MAX_BANDWIDTH = 2 ** 63 - 1
NO_LIMIT_ABOVE = 1 << 40  # bytes/s: a max-bandwidth no link reaches (1 TiB/s) is taken as none
# No limit that binds: for the last LIMIT_HORIZON_S of RAM at the recent pace,
# netpass sets one at LIMIT_SHARE of the pace on the wire, so that QEMU sends
# in windows again and the end can be planned by them.
LIMIT_HORIZON_S = 0.3
LIMIT_SHARE = 0.5
MIN_LIMIT = 8 << 20
COARSE_POLL_S = 0.005
FINE_POLL_S = 0.001
DEFAULT_RTT_S = 0.002  # a QMP round trip, before any is seen
DEFAULT_LEAD_S = 0.004  # park + restore, before a window starts (learned, see engaged())
LEAD_SAFETY_S = 0.001
PARK_S = 0.001  # switching the parking on (nft, measured 0.2-0.8 ms)
MAX_LEAD_S = 0.03
MAX_ENGAGE_MARGIN_S = 0.04  # the engage's allowance for the gap to the next sample, at most
ACTIVE = ("active", "setup")
# Attached to a migration someone else started (libvirt), QEMU is held back
# throttled until netpass is armed.  It stays throttled through the hand-off
# (``Endgame.handed_off``) when a run of zero pages could clear the RAM left
# before the endgame's first throttle could land: QEMU scans zero pages at up
# to ZERO_CLEAR_BPS (lab, TCG: 7 MB/ms), and the throttle comes a coarse poll
# and two QMP round trips after a sample at the earliest.  Released at once
# instead, a busy lab host's libvirt migration cleared 81 MB in the 11 ms
# after the hold-back ended, and QEMU stopped the VM unforeseen.
ZERO_CLEAR_BPS = 8_000_000_000
MAX_REACT_S = 0.05  # a react time (react_s) past this is a hiccup's
HANDOFF_MARGIN = 1.25
# ... and whatever the round trip, up to this much RAM left: the round trips
# that matter are the slow ones later in the migration, which the hand-off
# cannot know (a busy lab host's libvirt answered in 1 ms at the arm and in
# 30 ms at times later on).  The price: the park lasts as long as QEMU takes
# to send what was left (lab, 230-265 MB mostly of zero pages: 141-290 ms
# from the park to the stop); 512 MiB of data take 0.43 s at 10 Gbit/s.
HANDOFF_FLOOR = 512 << 20


def zero_reach(rtt_s: float) -> int:
    """RAM that zero pages could clear before a throttle lands: a coarse
    poll and two QMP round trips (the answer that shows the run, and the
    throttle) at ``rtt_s``."""
    return int(ZERO_CLEAR_BPS * (COARSE_POLL_S + 2 * rtt_s) * HANDOFF_MARGIN)


def handoff_reach(rtt_s: float) -> int:
    """Armed after a hold-back, with a QMP round trip of ``rtt_s``: the RAM
    left within which QEMU stays throttled until the park."""
    return max(HANDOFF_FLOOR, zero_reach(rtt_s))


def stays_throttled(remaining: int, rtt_s: float) -> bool:
    """Whether QEMU, armed after a hold-back with ``remaining`` bytes of RAM
    left, stays throttled until the park (``Endgame.handed_off``) rather
    than get its bandwidth back and be raced."""
    return remaining <= handoff_reach(rtt_s)


class Step(enum.Enum):
    WAIT = "wait"
    LIMIT = "limit"  # set max-bandwidth to ``max_bandwidth`` now (a limit that binds, for the end)
    THROTTLE = "throttle"  # set max-bandwidth to THROTTLE_BANDWIDTH now
    ENGAGE = "engage"  # park, restore max-bandwidth, send the sacrificial frames: now
    OVER = "over"  # the migration left 'active' before netpass engaged


class Phase(enum.Enum):
    WATCHING = "watching"
    THROTTLED = "throttled"
    ENGAGED = "engaged"
    OVER = "over"


def _slow(values: deque[float], default: float) -> float:
    """The 90th percentile of ``values`` (``default`` before there are 8)."""
    if len(values) < 8:
        return default
    return sorted(values)[int(0.9 * (len(values) - 1))]


def _typical(values: deque[float]) -> float:
    """The median of ``values`` (0 with none)."""
    return sorted(values)[len(values) // 2] if values else 0.0


def _rise(points: deque[tuple[float, int]]) -> float | None:
    """Change per second from the oldest point kept to the newest (None over
    less than 4 ms)."""
    if len(points) < 2:
        return None
    (t0, v0), (t1, v1) = points[0], points[-1]
    return None if t1 - t0 < 0.004 else (v1 - v0) / (t1 - t0)


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
    left0: int | None = None  # the RAM left before it

    def clears(self, s: Sample) -> float:
        """RAM it cleared per byte it sent, up to ``s`` (1: none known)."""
        if self.left0 is None or s.remaining is None or s.transferred is None or s.transferred <= self.sent0:
            return 1.0
        return max(1.0, (self.left0 - s.remaining) / (s.transferred - self.sent0))


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
    _ratio: float = 0.0  # RAM cleared per wire byte between the last two samples (0: none sent)
    _pace: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=16))
    _wire: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=16))
    limited_to: int | None = None  # the limit netpass set, if it set one (LIMIT)
    held_throughout: bool = False  # throttled from the hold-back on (handed_off)
    _rtts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    _late: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # samples' gaps over the poll asked
    _asked: float = 0.0  # the poll interval last asked for

    def handed_off(self, t: float, remaining: int) -> None:
        """The migration was held back throttled and stays so (see
        :func:`stays_throttled`): the endgame starts throttled, and engages
        at a window once it has seen one."""
        self._throttle(Sample(t, "active", remaining))
        self.held_throughout = True

    def __post_init__(self) -> None:
        if self.max_bandwidth >= NO_LIMIT_ABOVE:
            # libvirt's "unlimited" (about 8 EiB/s) is no limit: taken as one,
            # its window's reach made the zero-run rule throttle at the first
            # run of zero pages (lab, virsh migrate: at 136-184 MB left, then
            # parked 107-204 ms before the stop).
            self.max_bandwidth = 0

    @property
    def reach(self) -> int:
        """RAM of data one window could clear: its bytes, and a page more."""
        return int(self.max_bandwidth * PERIOD_S) + 2 * PAGE

    def release_bandwidth(self) -> int:
        """``max-bandwidth`` for the window after the park: the operator's,
        and enough more that it surely sends up to :attr:`reach` of RAM with
        its page headers (else it could leave a little, and the stop come a
        whole window later)."""
        if self.max_bandwidth <= 0:
            return 0
        # Throttled in a run of zero pages with more RAM left than a window's
        # reach: should the rest be data, the window gets the bytes for it
        # (once, up to ZERO_RUN_WINDOWS windows' worth), rather than leave
        # some and have the stop come a whole window later.
        rest = self.throttle_remaining or 0
        value = int(max(self.max_bandwidth, rest / PERIOD_S) * RELEASE_MARGIN)
        return min(value, max(self.max_bandwidth, MAX_BANDWIDTH))  # (QMP's max-bandwidth is a uint64)

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
                self.windows.append(Window(lo=prev.t, hi=s.t, sent0=prev.transferred, left0=prev.remaining))
            self._last_move = s.t
        if s.remaining is not None:
            self._pace.append((s.t, s.remaining))
        if s.transferred is not None:
            self._wire.append((s.t, s.transferred))
        if prev is not None:
            self._gap = s.t - prev.t
            self._late.append(max(0.0, self._gap - self._asked))
            self._ratio = 0.0
            if None not in (s.transferred, prev.transferred, s.remaining, prev.remaining):
                sent = s.transferred - prev.transferred  # type: ignore[operator]
                if sent > 0:
                    self._ratio = (prev.remaining - s.remaining) / sent  # type: ignore[operator]
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
        pace = _rise(self._pace)
        return -pace if pace is not None and pace < 0 else None

    def wire_pace(self) -> float | None:
        """Bytes per second on the wire lately."""
        pace = _rise(self._wire)
        return pace if pace is not None and pace > 0 else None

    def _limit_wanted(self, s: Sample) -> int | None:
        """A limit that binds, if one is due now: QEMU sends all along (no
        limit, or one the link never reaches) and the RAM would end within
        LIMIT_HORIZON_S.  Planned by the pace alone, runs of zero pages make
        the end come early or late by a lot (lab, libvirt's 8 EiB/s:
        throttled at 54-110 MB left, then parked for 30-234 ms while it
        went)."""
        assert s.remaining is not None
        if self.limited_to is not None or not (self.max_bandwidth <= 0 or self.continuous(s.t)):
            return None
        pace, wire = self.unlimited_pace(), self.wire_pace()
        if pace is None or wire is None or s.remaining > pace * LIMIT_HORIZON_S:
            return None
        limit = max(MIN_LIMIT, int(wire * LIMIT_SHARE))
        if self.max_bandwidth > 0 and limit >= self.max_bandwidth:
            return None
        return limit

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
            if self._in_zero_run_near_end(s):
                # Before any LIMIT: asked for at such a sample instead of the
                # throttle, a limit let the run finish the RAM (a busy-core
                # CI: limited, never throttled, stopped unforeseen).
                return self._throttle(s)
            limit = self._limit_wanted(s)
            if limit is not None:
                # From now on the windows are netpass's limit's, seen afresh.
                self.max_bandwidth = self.limited_to = limit
                self.windows.clear()
                self._last_move = None
                return Step.LIMIT
            if self._should_throttle(s):
                return self._throttle(s)
            return Step.WAIT
        # THROTTLED: engage just before the next window, which will finish the
        # RAM: at the last sample before it that leaves the lead (the next
        # sample comes about one polling gap later, and could be too late).
        nxt = self.next_start(s.t)
        # The margin: the gap the next sample likely comes after (the
        # polling pace and how late polls came, their median).  It was the
        # last gap capped at 5 ms: samples 21 ms apart kept stepping
        # over the span before the window, and a model host never engaged.
        # (Their 90th percentile parked a busy lab host 20-30 ms earlier.)
        margin = max(LEAD_SAFETY_S, min(max(self._gap, FINE_POLL_S + _typical(self._late)), MAX_ENGAGE_MARGIN_S))
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

    def _phase_known(self) -> bool:
        return len(self.windows) >= 1

    def rate_limited(self, t: float) -> bool:
        """Whether QEMU's ``max-bandwidth`` binds: a burst has ended in a
        quiet time (QEMU slept out its window) and the current one has not
        gone on for longer than a window.  A limit above what the link
        carries (libvirt sets about 8 EiB/s; or a slow link) never binds:
        QEMU sends all along, and a window's bytes say nothing of when the
        RAM ends (planned by them, such a migration was throttled at its
        first sample and then parked for all of it, or never throttled)."""
        if self.quota is None or len(self.windows) < 2 or self._last_move is None:
            return False
        return not self.continuous(t)

    def continuous(self, t: float) -> bool:
        """QEMU has sent without a quiet time for longer than a window."""
        if not self.windows or self._last_move is None:
            return False
        return t - self._last_move < QUIET_S and t - self.windows[-1].hi > PERIOD_S + QUIET_S

    def react_s(self) -> float:
        """How long a throttle decided at the next sample takes to land, as
        this host has lately been: a slow gap between samples (the polling
        pace, a query's round trip and however late the loop ran) and a slow
        round trip for the throttle itself (90th percentiles)."""
        late, rtt = _slow(self._late, DEFAULT_RTT_S), _slow(self._rtts, DEFAULT_RTT_S)
        return min(MAX_REACT_S, self._next_poll() + late + rtt)

    def zero_run_reach(self) -> int:
        """In a run of zero pages, the RAM left within which to throttle: a
        few windows' reach; without a limit, what the run could clear
        (ZERO_CLEAR_BPS) before a throttle asked at the next sample lands.
        Throttled there, the parked window carries the rest of the run,
        which goes fast, and what lies behind it.  (That reach with a limit
        too: a lab host's slow answers made it 60-146 MB, and the data
        behind the run parked the frames for 50-483 ms, median 100, against
        15-60 ms; the zero-run rule before any LIMIT is what a busy-core
        CI's unforeseen stop wanted.)"""
        if self.quota is None:
            return int(ZERO_CLEAR_BPS * self.react_s())
        return ZERO_RUN_WINDOWS * self.reach

    def _in_zero_run_near_end(self, s: Sample) -> bool:
        """A run of zero pages near the end: it and what follows may go in a
        blink.  Whatever the limit, and whether or not it has been seen to
        bind yet (right after netpass's own LIMIT its windows are seen
        afresh, and a CI with a busy core finished such a run unforeseen)."""
        assert s.remaining is not None
        return self._ratio >= ZERO_RUN_RATIO and s.remaining <= self.zero_run_reach()

    def _should_throttle(self, s: Sample) -> bool:
        quota = self.quota
        assert s.remaining is not None
        if self.rate_limited(s.t):  # (so quota is not None)
            if self._last_move is None or s.t - self._last_move >= BURST_OVER_S:
                # The burst used its window's bytes: the next window could
                # finish what is left if it fits the window's bytes, and one
                # page more (QEMU checks its limit after each page).  Not
                # ``quota``: RAM of data between the two (5% of a window)
                # was finished by a window netpass did not throttle.  And as
                # many times that as the last window cleared RAM per byte:
                # with zero pages among the data, a busy lab host's window
                # cleared 2.50 MB with bytes for 2.34 MB, before the throttle
                # its first sample asked for landed.
                # (Up to MIXED_MAX times: a lab window that cleared 7 times
                # its bytes had data behind it, and the frames stayed parked
                # for 477-588 ms while the parked window sent 100 MB.)
                mixed = min(self.windows[-1].clears(s), MIXED_MAX)
                return s.remaining <= self.reach * mixed * MIXED_MARGIN
            # In the middle of a burst: throttle only if what this window may
            # still send surely finishes the RAM (the race is then near);
            # otherwise let the burst use its bytes, and the last window
            # carry only what it left (a smaller last burst, after the park).
            w = self.windows[-1] if self.windows else None
            if w is None or s.transferred is None:
                return False
            left = int(self.max_bandwidth * PERIOD_S) - (s.transferred - w.sent0)
            return s.remaining + s.remaining // 256 + 4096 <= left
        # No limit, one that does not bind, or none seen to bind yet: the
        # recent pace says when the RAM ends (and, with a limit, no sooner
        # than a window could clear it: a first burst runs at the link's pace).
        pace = self.unlimited_pace()
        return pace is not None and s.remaining <= pace * HORIZON_S and \
            (quota is None or s.remaining <= self.reach)

    def poll_interval(self) -> float:
        """How long until the next sample: finely near the end."""
        self._asked = self._next_poll()
        return self._asked

    def _next_poll(self) -> float:
        if self.phase is Phase.THROTTLED:
            return FINE_POLL_S
        last = self._last
        quota = self.quota
        if last is None or last.remaining is None:
            return COARSE_POLL_S
        if self.limited_to is not None and not self.rate_limited(last.t):
            # netpass's own limit, its windows not yet seen: the RAM left is
            # within LIMIT_HORIZON_S of the pace before it, and a run of zero
            # pages in it can go in a few milliseconds.
            return FINE_POLL_S
        if quota is None or not self.rate_limited(last.t):  # (quota: for the type checker)
            pace = self.unlimited_pace()
            near = pace is None or last.remaining <= pace * NEAR_WINDOWS * PERIOD_S
            return FINE_POLL_S if near else COARSE_POLL_S
        if last.remaining <= NEAR_WINDOWS * quota:
            return FINE_POLL_S
        if last.remaining <= ZERO_RUN_POLL_WINDOWS * quota and self._in_or_near_burst(last.t):
            # A run of zero pages can go in a few milliseconds: it must be
            # sampled in, whether it starts the window or follows its data.
            return FINE_POLL_S
        return COARSE_POLL_S

    def _in_or_near_burst(self, t: float) -> bool:
        """QEMU is sending now, or the next window starts within a coarse poll."""
        if self._last_move is not None and t - self._last_move < QUIET_S:
            return True
        nxt = self.next_start(t)
        return nxt is None or nxt - t <= COARSE_POLL_S + FINE_POLL_S

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
            self.lead_s = max(self.lead_s, min(MAX_LEAD_S, 2 * _slow(self._rtts, rtt_s) + PARK_S))

    def missed_windows(self, stop_t: float) -> int:
        """Whole windows between the aimed-at start and the stop (0: on time)."""
        if self.planned_start is None or stop_t <= self.planned_start:
            return 0
        return int((stop_t - self.planned_start) // PERIOD_S)
