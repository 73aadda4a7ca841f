"""The endgame planner (pure): fed query-migrate samples, it says when to
throttle QEMU and when to park.  Synthetic migrations, and a page-by-page
model of the lab guest's RAM (``Qemu``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netpass.endgame import (
    FINE_POLL_S,
    HANDOFF_FLOOR,
    LEAD_SAFETY_S,
    PERIOD_S,
    ZERO_CLEAR_BPS,
    ZERO_RUN_WINDOWS,
    Endgame,
    Phase,
    Sample,
    Step,
    Window,
    stays_throttled,
    zero_reach,
)

BW = 128 << 20  # QEMU's default max-bandwidth, bytes/s
QUOTA_WIRE = BW // 10


def windows(ram: int, per_window: list[int], burst_s: float = 0.01, start: float = 0.05,
            poll: float = FINE_POLL_S, wake_late: float = 0.0005):
    """Samples of a rate-limited migration: each window starts a period after
    the last (plus a little wake-up lateness), sends ``per_window[k]`` bytes
    of RAM over ``burst_s``, then sleeps.  Yields (sample, window start)."""
    t, sent, remaining = 0.0, 0, ram
    w_start = start
    k = 0
    while True:
        chunk = per_window[min(k, len(per_window) - 1)]
        w_end = w_start + burst_s
        while t < w_start + PERIOD_S:
            if t >= w_start:
                frac = min(1.0, (t - w_start) / burst_s)
                r = max(0, remaining - int(chunk * frac))
                s = sent + (remaining - r)
            else:
                r, s = remaining, sent
            status = "active" if r > 0 or t < w_end else "completed"
            yield Sample(t, status, r, s), w_start
            if status == "completed":
                return
            t += poll
        sent += min(chunk, remaining)
        remaining = max(0, remaining - chunk)
        w_start += PERIOD_S + wake_late
        k += 1


def drive(eg: Endgame, gen, stop_at: Step) -> tuple[Sample, float] | None:
    for sample, w_start in gen:
        if eg.feed(sample) is stop_at:
            return sample, w_start
    return None


def test_throttles_once_the_ram_left_fits_a_window_and_not_before() -> None:
    eg = Endgame(BW)
    ram = 60 << 20
    hit = drive(eg, windows(ram, [QUOTA_WIRE]), Step.THROTTLE)
    assert hit is not None
    sample, _ = hit
    assert sample.remaining is not None and sample.remaining <= eg.quota  # type: ignore[operator]
    # It is the first quiet moment with that little left: one window earlier there was more.
    assert sample.remaining > 0
    assert eg.phase is Phase.THROTTLED


def test_engages_just_before_the_next_window() -> None:
    eg = Endgame(BW)
    gen = windows(50 << 20, [QUOTA_WIRE])
    assert drive(eg, gen, Step.THROTTLE) is not None
    # After the throttle QEMU sends a page a window; the planner waits for the
    # window after the last one it saw and engages lead + safety before it.
    hit = drive(eg, gen, Step.ENGAGE)
    assert hit is not None
    sample, _ = hit
    assert eg.planned_start is not None
    early = eg.planned_start - sample.t
    assert 0 <= early <= eg.lead_s + LEAD_SAFETY_S + FINE_POLL_S + 1e-9
    assert eg.phase is Phase.ENGAGED
    assert eg.feed(Sample(sample.t + 0.001, "active", 1, 1)) is Step.WAIT


def test_a_burst_that_could_finish_the_ram_is_throttled_in_its_middle() -> None:
    """Mid-burst, with more of the window's bytes left than RAM: the burst
    would go on to finish it, so throttle now."""
    eg = Endgame(BW)
    t = 0.0
    eg.feed(Sample(t, "active", 400 << 20, 0))
    t += 0.05
    eg.feed(Sample(t, "active", 390 << 20, 1 << 20))  # a window starts: 1 MiB sent
    t += 0.002
    step = eg.feed(Sample(t, "active", 2 << 20, 2 << 20))  # 2 MiB left, ~11 MiB of the window's bytes left
    assert step is Step.THROTTLE


def test_a_burst_without_enough_bytes_left_is_let_run() -> None:
    eg = Endgame(BW)
    eg.feed(Sample(0.0, "active", 40 << 20, 0))
    eg.feed(Sample(0.002, "active", 27 << 20, 13 << 20))  # a window's burst
    eg.feed(Sample(0.05, "active", 27 << 20, 13 << 20))  # its quiet time
    eg.feed(Sample(0.102, "active", 26 << 20, 14 << 20))  # the next window starts
    # 12 MiB of the window's bytes used, 10 MiB of RAM (of data) left: it cannot finish it.
    assert eg.feed(Sample(0.104, "active", 10 << 20, 26 << 20)) is Step.WAIT


def test_leaving_active_before_the_engage_is_over() -> None:
    eg = Endgame(BW)
    eg.feed(Sample(0.0, "active", 100 << 20, 0))
    assert eg.feed(Sample(0.01, "pre-switchover", 0, 10)) is Step.OVER
    assert eg.phase is Phase.OVER
    assert eg.feed(Sample(0.02, "active", 0, 10)) is Step.WAIT


class Link:
    """QEMU sending RAM of data over a link of ``pace`` bytes/s: with a
    limit, each window of 100 ms sends until its bytes are used and then
    sleeps; without one (0), or with one the link never reaches, it sends
    all along.  The planner's steps apply at once; it polls as it says."""

    def __init__(self, ram: int, pace: float, bw: int) -> None:
        self.left, self.sent, self.pace, self.bw = ram, 0, pace, bw
        self.t, self.w_start, self.used = 0.0, 0.0, 0

    def advance(self, dt: float) -> None:
        end = self.t + dt
        while self.t < end and self.left > 0:
            while self.t >= self.w_start + PERIOD_S - 1e-12:
                self.w_start += PERIOD_S
                self.used = 0
            step = max(1e-6, min(end, self.w_start + PERIOD_S) - self.t)
            can = int(self.pace * step)
            if self.bw > 0:
                can = min(can, max(0, self.bw // 10 - self.used))
            n = min(can, self.left)
            self.left, self.sent, self.used = self.left - n, self.sent + n, self.used + n
            self.t += step

    def run(self, eg: Endgame) -> tuple[list[Step], int]:
        """The planner's steps until it engages (or the RAM ends), and the RAM left then."""
        steps: list[Step] = []
        while True:
            step = eg.feed(Sample(self.t, "active" if self.left else "completed", self.left, self.sent))
            if step is not Step.WAIT:
                steps.append(step)
            if step is Step.LIMIT:
                self.bw = eg.max_bandwidth
            elif step is Step.THROTTLE:
                self.bw = 10
            elif step in (Step.ENGAGE, Step.OVER):
                return steps, self.left
            self.advance(eg.poll_interval())


@pytest.mark.parametrize("bw", [0, (2 ** 63 - 1) // (1 << 20) * (1 << 20), 8 << 50, 2 << 30])
def test_a_limit_that_never_binds_is_made_to_bind_near_the_end(bw: int) -> None:
    """No limit (0), libvirt's (about 8 EiB/s), or one over what the link
    carries: QEMU sends all along, and a window's bytes say nothing of when
    the RAM ends.  Planned by them, libvirt's was throttled at its first
    sample and parked for the whole migration, and a limit over the link's
    pace was never throttled.  Now netpass sets a limit at half the pace for
    the last 0.3 s of RAM, and then plans by the windows: it engages with
    what one window sends left."""
    eg = Endgame(bw)
    steps, left = Link(1 << 30, 1e9, bw).run(eg)
    assert steps == [Step.LIMIT, Step.THROTTLE, Step.ENGAGE], steps
    assert eg.limited_to is not None and abs(eg.limited_to - 5e8) < 5e7
    assert 0 < left <= eg.release_bandwidth() * PERIOD_S
    assert eg.release_bandwidth() <= 2 ** 64 - 1


def test_a_limit_that_binds_is_left_alone() -> None:
    eg = Endgame(BW)
    steps, left = Link(1 << 30, 1e9, BW).run(eg)
    assert steps == [Step.THROTTLE, Step.ENGAGE] and eg.limited_to is None
    assert 0 < left <= eg.reach


def test_missed_windows_counts_whole_periods_after_the_aimed_start() -> None:
    eg = Endgame(BW)
    eg.planned_start = 1.0
    assert eg.missed_windows(1.004) == 0
    assert eg.missed_windows(1.104) == 1
    assert eg.missed_windows(0.99) == 0


def test_lead_learns_from_how_long_the_engage_took() -> None:
    eg = Endgame(BW)
    for _ in range(20):
        eg.engaged(0.002)
    assert abs(eg.lead_s - 0.002) < 0.0002


def test_a_window_that_clears_the_rest_by_surprise_is_seen_as_over() -> None:
    """Zero pages cost 9 bytes on the wire: a window can clear far more RAM
    than its bytes.  One that starts with more than a window's bytes of RAM
    left and clears it all gives no warning: the planner never throttled,
    and sees the migration leave 'active' (the source's fallback)."""
    eg = Endgame(BW)
    steps = [eg.feed(s) for s, _ in windows(100 << 20, [60 << 20])]
    assert Step.THROTTLE not in steps and steps[-1] is Step.OVER


@settings(max_examples=200, deadline=None)
@given(ram_mib=st.integers(20, 400), burst_ms=st.integers(2, 40), wake_us=st.integers(0, 2000),
       poll_us=st.integers(500, 1500))
def test_never_engages_after_the_window_it_aims_at(ram_mib: int, burst_ms: int, wake_us: int,
                                                   poll_us: int) -> None:
    """Over many rate-limited migrations whose windows send their bytes'
    worth of RAM (RAM size, burst length, wake-up lateness, polling): the
    planner throttles once the RAM left fits a window, and then engages
    before the next window starts, never after it."""
    eg = Endgame(BW)
    gen = windows(ram_mib << 20, [QUOTA_WIRE], burst_s=burst_ms / 1000, poll=poll_us / 1e6,
                  wake_late=wake_us / 1e6)
    throttled_in: float | None = None
    for sample, w_start in gen:
        step = eg.feed(sample)
        if step is Step.THROTTLE:
            throttled_in = w_start
            break
    assert throttled_in is not None, "finished without a throttle"
    # Throttled: the synthetic QEMU keeps its rhythm but sends nothing more.
    t = sample.t
    nxt = throttled_in + PERIOD_S + wake_us / 1e6
    sent = sample.transferred or 0
    while True:
        t += poll_us / 1e6
        while t >= nxt + 0.0001:
            nxt += PERIOD_S + wake_us / 1e6
        moved = nxt <= t < nxt + 0.0002
        step = eg.feed(Sample(t, "active", sample.remaining, sent + (8 if moved else 0)))
        if moved:
            sent += 8
        if step is Step.ENGAGE:
            # The engage must be done before the window starts.
            real_next = nxt if nxt > t else nxt + PERIOD_S + wake_us / 1e6
            assert t + eg.lead_s <= real_next + 1e-9, (t, real_next)
            return
        assert t < throttled_in + 1.0, "never engaged"


def zero_windows(ram: int, mix: float, burst_s: float = 0.012, poll: float = 0.002):
    """A migration whose windows clear ``mix`` bytes of RAM per wire byte
    (zero pages: some 455), each sending its quota over ``burst_s``."""
    t, sent, remaining, w_start = 0.0, 0, ram, 0.05
    while True:
        while t < w_start + PERIOD_S:
            frac = min(1.0, max(0.0, (t - w_start) / burst_s))
            wire = int(QUOTA_WIRE * frac)
            r = max(0, remaining - int(wire * mix))
            yield Sample(t, "active" if r > 0 else "completed", r, sent + wire)
            if r == 0:
                return
            t += poll
        sent += QUOTA_WIRE
        remaining = max(0, remaining - int(QUOTA_WIRE * mix))
        w_start += PERIOD_S


class Qemu:
    """A rate-limited migration, page by page: RAM scanned in order, a zero
    page 9 bytes on the wire, one that holds data 4105; each window sends
    until its bytes (max-bandwidth / 10) are used.  Its pages go out evenly
    over ``burst_s``, or, with ``page_us`` (zero page, data page), each
    takes that long (the lab: 0.6 and 6 us).  A throttle applies
    ``latency`` seconds after the sample that asked for it (a QMP round
    trip), and the planner polls as it says (``poll``: at fixed steps),
    each poll ``late`` seconds later than asked (a busy host)."""

    def __init__(self, zero: list[bool], bw: int = BW, burst_s: float = 0.012,
                 page_us: tuple[float, float] | None = None, latency: float = 0.0, late: float = 0.0) -> None:
        self.zero, self.bw, self.burst_s = zero, bw, burst_s
        self.page_us, self.latency, self.late = page_us, latency, late
        self.page, self.sent, self.t = 0, 0, 0.0
        self.w_start = 0.05
        self.plan: list[tuple[int, int, float]] = []  # this window's (page, sent, time) after each page

    def _window(self, quota: int | None = None) -> None:
        quota = self.bw // 10 if quota is None else quota
        used, self.plan = 0, []
        page, sent, t = self.page, self.sent, self.w_start
        n = 0
        while page < len(self.zero) and used <= quota:
            cost = 9 if self.zero[page] else 4105
            if self.page_us is not None:
                t += self.page_us[0 if self.zero[page] else 1] / 1e6
            used, sent, page, n = used + cost, sent + cost, page + 1, n + 1
            self.plan.append((page, sent, t))
        if self.page_us is None:  # evenly over the burst
            self.plan = [(p, s, self.w_start + self.burst_s * (i + 1) / n) for i, (p, s, _t) in enumerate(self.plan)]

    def _done(self, t: float) -> int:
        return sum(1 for _p, _s, pt in self.plan if pt <= t)

    def run(self, eg: Endgame, poll: float | None = 0.002) -> list[Step]:
        steps: list[Step] = []
        self._window()
        throttle_at: float | None = None
        while True:
            if self.t >= self.w_start + PERIOD_S:
                self.page, self.sent = self.plan[-1][:2] if self.plan else (self.page, self.sent)
                self.w_start += PERIOD_S
                self._window()
            if throttle_at is not None and self.t >= throttle_at:
                # From then on, this window's pages count against the throttle.
                self.bw = 10
                self.plan = self.plan[:max(self._done(throttle_at), 1)]
                throttle_at = None
            k = self._done(self.t)
            page, sent = self.plan[k - 1][:2] if k else (self.page, self.sent)
            left = (len(self.zero) - page) * 4096
            step = eg.feed(Sample(self.t, "active" if left else "completed", left, sent))
            if self.latency:
                eg.qmp_answered(self.latency)
            steps.append(step)
            if step is Step.THROTTLE:
                throttle_at = self.t + self.latency
                if not self.latency:
                    self.bw, self.plan, throttle_at = 10, self.plan[:max(k, 1)], None
            if step in (Step.ENGAGE, Step.OVER):
                return steps
            self.t += (poll if poll is not None else eg.poll_interval()) + self.late


def test_data_alone_is_parked_for_and_so_is_a_run_of_zero_pages_seen_in_time() -> None:
    """Page by page: RAM that holds data is parked for.  A window whose RAM
    ends in zero pages (9 bytes each on the wire) clears far more than its
    bytes: seen mid-run, it is throttled there."""
    assert Qemu([False] * 20_000).run(Endgame(BW))[-1] is Step.ENGAGE
    assert Qemu([False] * 12_000 + [True] * 30_000).run(Endgame(BW))[-1] is Step.ENGAGE


def lab_ram(tail_pages: int) -> list[bool]:
    """The lab guest's RAM as its migrations show it: data, then some 100 MB
    of zero pages, then a tail of data."""
    return [False] * 20_000 + [True] * 25_000 + [False] * tail_pages


@pytest.mark.parametrize("latency_ms", [1, 3])
def test_a_run_of_zero_pages_then_a_tail_of_data_is_parked_for(latency_ms: int) -> None:
    """The lab's layout, with each page's time as the lab shows it and QMP
    round trips of 1-3 ms: the window that reaches the zero pages is
    throttled in the run, whatever the tail (0.4-12 MB).  The rule before
    (throttle mid-burst only once the RAM left fits the window's bytes left)
    saw the tail only once the run was over, and lost the race for tails
    the window sends within a poll and a round trip."""
    for tail in (100, 500, 1000, 2000, 3000):
        steps = Qemu(lab_ram(tail), page_us=(0.6, 6.0), latency=latency_ms / 1000).run(Endgame(BW), poll=None)
        assert steps[-1] is Step.ENGAGE, (tail, latency_ms)


def test_a_short_tail_behind_zero_pages_came_unforeseen_with_the_rule_before() -> None:
    """The teeth of the test above: without the zero-run rule (ratio never
    high enough), a short tail finishes the RAM unforeseen."""
    import netpass.endgame as eg_mod
    saved = eg_mod.ZERO_RUN_RATIO
    eg_mod.ZERO_RUN_RATIO = float("inf")
    try:
        steps = Qemu(lab_ram(100), page_us=(0.6, 6.0), latency=0.003).run(Endgame(BW), poll=None)
    finally:
        eg_mod.ZERO_RUN_RATIO = saved
    assert steps[-1] is Step.OVER


def busy_host_misses(late: float) -> int:
    """Of 24 lab-like layouts (data, a run of 60-100 MB of zero pages, a
    tail of 0.2-10 MB), how many finish unforeseen when every poll comes
    ``late`` and a throttle lands 3 ms after its sample.  (Over 140 such
    layouts, 2 ms late: 7 before fine polling near bursts, 0 with it.)"""
    misses = 0
    for data in range(20_000, 23_500, 1_000):
        for tail in (50, 300, 2500):
            for run in (15_000, 25_000):
                q = Qemu([False] * data + [True] * run + [False] * tail, page_us=(0.6, 6.0), latency=0.003, late=late)
                misses += q.run(Endgame(BW), poll=None)[-1] is Step.OVER
    return misses


def test_a_run_of_zero_pages_is_parked_for_when_polls_come_late() -> None:
    """Polls that come late (a loaded host) still see the run in time: near
    the end the planner polls finely through each burst and from just
    before each window's start, not only once a sample has shown a run."""
    assert busy_host_misses(0.002) == 0


def test_polls_coarse_between_bursts_missed_runs_that_start_a_window() -> None:
    """The teeth: polled coarsely until a sample showed a run, a window that
    starts with the run (or reaches it early) finished the RAM between two
    late polls (a CI with a busy core: throttled at 0 bytes left)."""
    saved = Endgame._in_or_near_burst
    Endgame._in_or_near_burst = lambda self, t: False  # type: ignore[method-assign]
    try:
        assert busy_host_misses(0.002) > 0
    finally:
        Endgame._in_or_near_burst = saved  # type: ignore[method-assign]


def test_ram_of_data_just_over_the_quota_is_parked_for() -> None:
    """RAM of data that a window's bytes can just clear, but more than its
    quota (which leaves room for page headers): the code before throttled
    only at the quota, and 13,078-13,080 pages here finished unforeseen."""
    for pages in range(13_050, 13_110):  # (the unforeseen ones were 13,078-13,080)
        assert Qemu([False] * pages).run(Endgame(BW))[-1] is Step.ENGAGE, pages


def test_the_parked_window_gets_bytes_for_what_it_could_have_cleared() -> None:
    eg = Endgame(BW)
    assert eg.release_bandwidth() * PERIOD_S * 4096 / 4104 >= eg.reach + 4104
    assert Endgame(0).release_bandwidth() == 0


def test_a_throttle_in_a_run_of_zero_pages_gives_the_parked_window_bytes_for_all_of_it() -> None:
    """Throttled with up to three windows' reach of RAM left: should it all
    be data, the window after the park still sends it (once), and the stop
    comes in it rather than a window later."""
    eg = Endgame(BW)
    eg.throttle_remaining = 3 * eg.reach
    assert eg.release_bandwidth() * PERIOD_S * 4096 / 4105 >= 3 * eg.reach
    eg.throttle_remaining = eg.reach // 2
    assert eg.release_bandwidth() == int(BW * 1.06)



def test_a_continuous_migration_is_polled_finely_only_near_its_end() -> None:
    eg = Endgame(8 << 50)
    t, r = 0.0, 1 << 30
    for _ in range(40):
        eg.feed(Sample(t, "active", r, (1 << 30) - r))
        t, r = t + 0.005, r - 5_000_000
    assert eg.poll_interval() > FINE_POLL_S  # 800 MB left at 1 GB/s


class SlowLinkQemu(Qemu):
    """The page model with a limit the link does not reach (a data page
    takes ``page_us[1]``, slower than the limit allows): each window sends
    all along, until the next one starts, so the planner sets its own limit
    (``Step.LIMIT``).  A limit or throttle applies ``latency`` after its
    sample, to the window under way: the pages it had sent stay sent, and it
    goes on only while its bytes fit the new limit."""

    def _window(self, quota: int | None = None) -> None:
        quota = self.bw // 10 if quota is None else quota
        used, self.plan, self.w_sent0 = 0, [], self.sent
        page, sent, t = self.page, self.sent, self.w_start
        assert self.page_us is not None
        while page < len(self.zero) and used <= quota and t < self.w_start + 2 * PERIOD_S:
            cost = 9 if self.zero[page] else 4105
            t += self.page_us[0 if self.zero[page] else 1] / 1e6
            used, sent, page = used + cost, sent + cost, page + 1
            self.plan.append((page, sent, t))

    def _limit(self, bw: int, t: float) -> None:
        self.bw = bw
        kept = self.plan[:self._done(t)]
        for item in self.plan[len(kept):]:
            if kept and kept[-1][1] - self.w_sent0 > bw // 10:
                break
            kept.append(item)
        self.plan = kept

    def run(self, eg: Endgame, poll: float | None = None) -> list[Step]:
        steps: list[Step] = []
        self._window()
        due: list[tuple[float, int]] = []
        while True:
            if self.t >= self.w_start + PERIOD_S:
                k = self._done(self.w_start + PERIOD_S)
                if k:
                    self.page, self.sent = self.plan[k - 1][:2]
                self.w_start += PERIOD_S + 0.0005  # (QEMU wakes a little late)
                self._window()
            for at, bw in [d for d in due if d[0] <= self.t]:
                due.remove((at, bw))
                self._limit(bw, at)
            k = self._done(self.t)
            page, sent = self.plan[k - 1][:2] if k else (self.page, self.sent)
            left = (len(self.zero) - page) * 4096
            step = eg.feed(Sample(self.t, "active" if left else "completed", left, sent))
            eg.qmp_answered(self.latency)
            steps.append(step)
            if step is Step.LIMIT:
                due.append((self.t + self.latency, eg.max_bandwidth))
            elif step is Step.THROTTLE:
                due.append((self.t + self.latency, 10))
            elif step in (Step.ENGAGE, Step.OVER):
                return steps
            self.t += eg.poll_interval() + self.late


def after_own_limit_misses() -> int:
    """Of 8 lab-like layouts on a link slower than QEMU's default limit
    (data pages at 40 us: about 100 MB/s), how many finish unforeseen."""
    misses = 0
    for data in (40_000, 46_000):
        for run in (15_000, 25_000):
            for tail in (50, 1_000):
                q = SlowLinkQemu([False] * data + [True] * run + [False] * tail, page_us=(0.6, 40.0), latency=0.003)
                eg = Endgame(BW)
                steps = q.run(eg)
                assert Step.LIMIT in steps and eg.limited_to is not None
                misses += steps[-1] is Step.OVER
    return misses


def test_a_run_of_zero_pages_right_after_netpass_sets_its_limit_is_parked_for() -> None:
    """After its own LIMIT the planner sees the windows afresh and needs two
    before it knows the limit binds.  The zero-run rule and fine polling
    lived only in that rate-limited branch, and a run with a short tail that
    came before then finished unforeseen (4 of these 8 layouts; a CI with a
    busy core, killed at completion: 1 lost).  They now hold whenever a limit
    is set."""
    assert after_own_limit_misses() == 0


def test_without_the_zero_run_rule_a_short_tail_after_the_limit_is_missed() -> None:
    """The teeth of the test above."""
    import netpass.endgame as eg_mod
    saved = eg_mod.ZERO_RUN_RATIO
    eg_mod.ZERO_RUN_RATIO = float("inf")
    try:
        assert after_own_limit_misses() > 0
    finally:
        eg_mod.ZERO_RUN_RATIO = saved


def test_a_held_back_migration_stays_throttled_with_little_ram_left() -> None:
    """The transparent hand-off: the lab guest's 230-265 MB stay throttled;
    a large guest gets its bandwidth back, unless QMP answers so slowly
    that zero pages could clear what is left before a throttle lands."""
    assert stays_throttled(265 << 20, 0.001)
    assert stays_throttled(HANDOFF_FLOOR, 0.0)
    assert not stays_throttled(HANDOFF_FLOOR + 1, 0.001)
    assert not stays_throttled(2 << 30, 0.03)
    assert zero_reach(0.2) > 3 << 30 and stays_throttled(3 << 30, 0.2)


@pytest.mark.parametrize("bw", [0, BW])
def test_handed_off_throttled_it_engages_just_before_a_window(bw: int) -> None:
    """From the hold-back on, QEMU sends one page a window: the endgame,
    started throttled, learns the windows' phase and engages just before
    one, which gets the bytes for all the RAM left (none: no limit)."""
    ram = 240 << 20
    eg = Endgame(bw)
    eg.handed_off(0.0, ram)
    assert eg.phase is Phase.THROTTLED and eg.held_throughout
    hit = drive(eg, windows(ram, [4096], burst_s=0.001), Step.ENGAGE)
    assert hit is not None
    sample, w_start = hit
    nxt = w_start if sample.t <= w_start else w_start + PERIOD_S
    assert 0 <= nxt - sample.t <= eg.lead_s + LEAD_SAFETY_S + FINE_POLL_S + 1e-9
    assert eg.release_bandwidth() == 0 if bw == 0 else eg.release_bandwidth() * PERIOD_S >= ram


@pytest.mark.parametrize("bw", [0, 2 << 30])
def test_a_run_of_zero_pages_seen_when_a_limit_is_due_is_throttled_not_limited(bw: int) -> None:
    """No limit, or one the link never reaches: QEMU sends all along, and
    netpass would set a limit for the last 0.3 s of RAM.  A sample that
    shows a run of zero pages near the end gets the throttle: the limit
    asked there instead let the run finish the RAM (a busy-core CI:
    limited, never throttled, stopped unforeseen)."""
    eg = Endgame(bw)
    t, r, sent = 0.0, 1 << 30, 0
    for _ in range(40):  # data at 1 GB/s, for 200 ms
        assert eg.feed(Sample(t, "active", r, sent)) is Step.WAIT
        t, r, sent = t + 0.005, r - 5_000_000, sent + 5_000_000
    # A run of zero pages: 770 MB of RAM for 2 MB on the wire, 30 MB left.
    assert eg.feed(Sample(t, "active", 30_000_000, sent + 2_000_000)) is Step.THROTTLE
    assert eg.limited_to is None


def test_without_a_limit_the_zero_run_reach_follows_the_host() -> None:
    """Without a limit there is no window's reach: in a run, netpass
    throttles within what zero pages could clear before a throttle asked at
    the next sample lands, and that grows with slow answers."""
    eg = Endgame(0)
    quick = eg.zero_run_reach()
    for _ in range(16):
        eg.qmp_answered(0.01)
    assert eg.zero_run_reach() >= quick + ZERO_CLEAR_BPS * 0.008
    assert Endgame(BW).zero_run_reach() == ZERO_RUN_WINDOWS * Endgame(BW).reach


def engage_time_with_gaps(gap: float) -> float | None:
    """Throttled from the start, a page a window (windows 100.5 ms apart),
    sampled every ``gap``: when the endgame engages (None: not in 3 s)."""
    eg = Endgame(BW)
    eg.handed_off(0.0, 100 << 20)
    t, sent, w = 0.0, 0, 0.05
    while t < 3.0:
        t += gap
        while w <= t:
            sent, w = sent + 4105, w + PERIOD_S + 0.0005
        if eg.feed(Sample(t, "active", 100 << 20, sent)) is Step.ENGAGE:
            return t
    return None


@pytest.mark.parametrize("gap", [0.008, 0.013, 0.021, 0.034])
def test_samples_far_apart_still_engage(gap: float) -> None:
    """The engage waits for a sample within the lead and a margin before the
    next window.  The margin was the last gap, capped at 5 ms: samples
    21 ms apart (a busy host) kept stepping over that span, and the endgame
    never engaged.  It is now the slow gap (FINE_POLL_S and how late polls
    came), up to MAX_ENGAGE_MARGIN_S."""
    assert engage_time_with_gaps(gap) is not None


def mixed_misses(every: int) -> int:
    """Of 24 rate-limited migrations of 55-107 MB whose RAM holds a zero page
    every ``every`` pages among its data, how many finish unforeseen (QMP
    round trips of 3 ms)."""
    misses = 0
    for pages in range(14_000, 26_000, 500):
        q = Qemu([i % every == 0 for i in range(pages)], page_us=(0.6, 6.0), latency=0.003)
        misses += q.run(Endgame(BW), poll=None)[-1] is Step.OVER
    return misses


def test_a_window_whose_data_holds_zero_pages_is_throttled_for_what_it_could_clear() -> None:
    """With zero pages among the data a window clears more RAM than its
    bytes: after a burst, netpass throttles once the RAM left is within a
    window's reach times what the last window cleared per byte."""
    assert [mixed_misses(k) for k in (2, 3, 5)] == [0, 0, 0]


def test_a_window_s_reach_taken_as_all_data_missed_mixed_pages() -> None:
    """The teeth: taken as data alone (a busy lab host's window cleared
    2.50 MB with bytes for 2.34 MB), some of them finished unforeseen."""
    saved = Window.clears
    Window.clears = lambda self, s: 1.0  # type: ignore[method-assign]
    try:
        assert all(mixed_misses(k) > 0 for k in (2, 3, 5))
    finally:
        Window.clears = saved  # type: ignore[method-assign]
