"""The destination's holds (``hold.py``) over a session: live frames
toward the VM wait in the kernel from the source's park, and go in after
the forwarded ones, at the pace the VM reads (flow control; with strict
ordering, once every forwarded frame is read, and the guest's own
transmissions wait until then too).  Also one queue for a multiqueue tap
while forwarded frames go in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from . import hold as holdmod
from .blocking import off_loop
from .destfeed import Replay
from .deststate import DestNic, DestState
from .errors import KernelError, NetpassError, SessionError
from .nics import rss_in_use
from .pacing import RELEASE_STEP_S, Window, ask_hold, grant_needed, release_window, window_min
from .qmp import QMP

log = logging.getLogger(__name__)

# Strict ordering, multiqueue: after the tap is given its own queue choice
# back, how long the held live frames still wait for the VM to handle what
# queue 0 holds (see Holds.unpin_queues).
UNPIN_SETTLE_S = 0.02
HOLD_LIMIT_BYTES = 64 << 20  # per direction and NIC: what a hold queues at most
MAX_HOLD_TIMEOUT_MS = 60_000
# Without --strict-ordering the hold is flow control only: live frames wait in
# it from the source's park while the VM does not run, and then go in at the
# pace the VM reads, for at most this long after the resume.
FLOW_HOLD_TIMEOUT_MS = 10_000
# What a hold still holds goes in at the VM's pace as long as the VM gains
# on it (up to flow control's bound); one whose backlog has not reached a
# new low for this long gets the rest at once, and the hold goes: a VM that
# cannot keep up with its traffic is no better served by a longer hold.
# (1 s cut a slow VM short on a busy core: the kernel test of
# test_release_pace lost 1,913 frames to a ring overflow, 3 runs in 3.)
FLOW_STUCK_S = 3.0


class HoldsIO(Protocol):
    """The session's I/O the holds need."""

    mon: QMP | None

    def on_exit(self, what: str, fn: Callable[..., Any], *args: Any) -> None: ...

    def task(self, coro: Awaitable[None], what: str) -> asyncio.Task[None]: ...


class Holds:
    def __init__(self, st: DestState, replay: Replay, io: HoldsIO) -> None:
        self.st, self.replay, self.io = st, replay, io
        self.lock = asyncio.Lock()  # one hold operation at a time (feeder, finish, cleanup)
        self.flow_release: asyncio.Task[None] | None = None  # without strict ordering: the paced release
        self.strict_release: asyncio.Task[None] | None = None  # strict: the release once the source settled

    # -- one queue while frames are forwarded ---------------------------------------------
    async def pin_queue(self, dn: DestNic, qemu_pid: int) -> None:
        """A multiqueue tap sends each flow to the queue its VM last sent it
        on (tun's automatic steering).  The VM's first replies after its
        resume can move a flow to another queue while the forwarded frames
        still wait in the first, and the VM, reading its queues in any
        order, then takes later frames first (lab, 4 queues: 437-639
        replies reordered).  Until the forwarded frames are in, every frame
        toward the VM goes to queue 0: one queue, one order.  Not done when
        QEMU may steer the queues itself (virtio-net RSS): its program
        would be replaced and could not be put back; nor without a hold,
        whose guard gives the tap its queue choice back should the agent
        die."""
        assert self.io.mon is not None
        rss = await rss_in_use(self.io.mon, dn.nic.mac)
        if rss or rss is None or dn.hold is None:
            if rss:
                why = "QEMU steers them with RSS"
            elif rss is None:
                why = "QEMU cannot say whether it steers them (RSS)"
            else:
                why = "no hold to guard the change"
            self.st.hold_notes.append(f"{dn.nic.tap}: {len(dn.fds)} queues and {why}: forwarded "
                                   "frames may be read out of order across queues")
            return
        try:
            await asyncio.to_thread(dn.hold.pin_queue, dn.fds[0], qemu_pid, dn.nic.qemu_fds[0])
        except KernelError as exc:
            self.st.hold_notes.append(f"{dn.nic.tap}: cannot keep its queues to one ({exc}): forwarded "
                                   "frames may be read out of order across queues")
            return
        dn.pinned_t = time.monotonic()
        self.io.on_exit(f"giving {dn.nic.tap} its automatic queue choice back", self.unpin_queue, dn)

    def unpin_queue(self, dn: DestNic) -> None:
        if dn.pinned_t is None or dn.hold is None:
            return
        dn.hold.unpin_queue(dn.fds[0])
        dn.pinned_ms = round((time.monotonic() - dn.pinned_t) * 1000, 1)
        dn.pinned_t = None

    async def unpin_queues(self, deadline: float, settle_s: float = 0.0) -> None:
        """Every forwarded frame is in: the tap chooses queues by itself
        again, once QEMU has read what queue 0 holds.  A frame sent to
        another queue after that can still be read by the VM first, if it
        is slow to handle queue 0: with strict ordering the live frames are
        still held here, and wait ``settle_s`` more.  Without it they are
        not, and that one moment may reorder a frame (seen once in the lab
        with 4 queues: 1 reply)."""
        unpinned = False
        for dn in self.st.nics:
            if dn.pinned_t is None:
                continue
            while self.st.running and not dn.ring_empty() and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            self.unpin_queue(dn)
            unpinned = True
        if unpinned and settle_s:
            await asyncio.sleep(min(settle_s, max(0.0, deadline - time.monotonic())))

    # -- the holds ------------------------------------------------------------------------
    async def install_strict(self, strict: Any) -> None:
        try:
            timeout_ms = int(strict.get("hold_timeout_ms", 0)) if isinstance(strict, dict) else 0
        except (TypeError, ValueError):
            timeout_ms = 0
        if not 0 < timeout_ms <= MAX_HOLD_TIMEOUT_MS:
            raise SessionError("bad_request", f"hold_timeout_ms must be 1..{MAX_HOLD_TIMEOUT_MS}")
        self.st.strict, self.st.hold_timeout_ms = True, timeout_ms
        for dn in self.st.nics:
            try:
                dn.hold = await asyncio.to_thread(holdmod.Hold.install, self.st.sid, dn.nic.tap,
                                                  self.st.cfg.holds_dir, HOLD_LIMIT_BYTES, timeout_ms)
            except NetpassError as exc:
                raise SessionError("strict", f"strict ordering is not possible on {dn.nic.tap}: {exc}") from exc
            await off_loop(dn.hold.start_guard)
            if dn.hold.mirror_fd is not None:
                asyncio.get_running_loop().add_reader(dn.hold.mirror_fd, self.replay.pull_mirror, dn)

    async def install_flow(self) -> None:
        """Flow control without strict ordering: the live frames toward the
        VM wait in the kernel, not in the tap's ring, until the VM reads
        them (a VM slow to read after its resume would have them dropped by
        a full ring).  Not possible on this host: the session goes on
        without it, and says so."""
        self.st.hold_timeout_ms = FLOW_HOLD_TIMEOUT_MS
        for dn in self.st.nics:
            try:
                # (The timeout given is the plug's, before the VM runs; the
                # paced release after it is bounded by FLOW_HOLD_TIMEOUT_MS.)
                dn.hold = await asyncio.to_thread(holdmod.Hold.install, self.st.sid, dn.nic.tap,
                                                  self.st.cfg.holds_dir, HOLD_LIMIT_BYTES, 1000, False)
            except NetpassError as exc:
                self.st.hold_notes.append(f"no flow control on {dn.nic.tap}: {exc}")
                log.warning("session=%s no flow control on %s: %s", self.st.sid, dn.nic.tap, exc)
                continue
            await off_loop(dn.hold.start_guard)
            if dn.hold.mirror_fd is not None:
                asyncio.get_running_loop().add_reader(dn.hold.mirror_fd, self.replay.pull_mirror, dn)
        # Closed at once: until the VM runs nothing reads the tap anyway, and
        # the source's park may come a few milliseconds before the resume.
        await self.close()

    async def close(self) -> None:
        """The source parked: from now on the destination holds live RX (and guest TX, strict)."""
        if not self.st.holding() or self.st.hold_closed:
            return
        self.st.hold_closed = True
        for dn in self.st.nics:
            if dn.hold is not None:
                await asyncio.to_thread(dn.hold.close)
        assert self.io.mon is not None
        if await self.io.mon.status() == "running":
            for dn in self.st.nics:
                if dn.hold is not None:
                    dn.hold.stats.late = True
            self.st.hold_notes.append("the destination VM was already running when the hold closed: "
                                   "frames before that were not held")
        log.info("session=%s hold closed on %s", self.st.sid, ", ".join(d.nic.tap for d in self.st.nics))

    async def release_tx_when_ready(self) -> None:
        async with self.lock:
            await self._release_tx_when_ready_locked()

    async def release_rx(self, deadline: float) -> None:
        async with self.lock:
            await self._release_rx_locked(deadline)

    async def remove(self) -> None:
        async with self.lock:
            await self._remove_locked()

    def flow_bound(self) -> float:
        """Until when live frames may go in at the VM's pace after its resume."""
        if self.st.resume_t is None:
            return float("inf")
        return self.st.resume_t + FLOW_HOLD_TIMEOUT_MS / 1000

    def expired(self) -> bool:
        now = time.monotonic()
        if self.st.resume_t is not None and now > self.st.resume_t + self.st.hold_timeout_ms / 1000:
            return True
        # The plug itself is tight only for so long after it closed (a paced
        # release is no plug: this holds until the release starts).
        return any(dn.hold is not None and dn.hold.stats.closed_t is not None and
                   dn.hold.stats.rx_release_started_t is None and
                   now > dn.hold.stats.closed_t + dn.hold.tight_s for dn in self.st.nics)

    async def _release_tx_when_ready_locked(self) -> None:
        """Guest TX is held until everything forwarded so far is inside the VM."""
        if not self.st.hold_closed or not self.st.running:
            return
        holds = [dn.hold for dn in self.st.nics if dn.hold is not None and dn.hold.stats.tx_released_t is None]
        if not holds:
            return
        if not self.expired():
            if not self.replay.replay_read():
                return
        for h in holds:
            await asyncio.to_thread(h.release_tx)
        log.info("session=%s guest TX released", self.st.sid)

    async def _release_rx_locked(self, deadline: float) -> None:
        """Live RX goes in after the last forwarded frame, in windows the VM's
        ring has room for (pacing.py); past flow control's
        bound or ``deadline``, all at once (and the report says so)."""
        for dn in self.st.nics:
            h = dn.hold
            if h is None or h.removed or h.stats.rx_released_t is not None:
                continue
            if h.stats.tx_released_t is None:
                await asyncio.to_thread(h.release_tx)
            await self._start_window(dn, h, keep=False)
            log.info("session=%s releasing %d held frame(s) toward the VM, as its ring has room",
                     self.st.sid, h.stats.held_rx)
            # Once the release runs, the frames it holds are newer than every
            # forwarded one: order is kept whatever their pace, and the strict
            # hold timeout (which bounds the wait for forwarded frames) no
            # longer applies.  Dumping them at that timeout overflowed the
            # ring of a VM that took a flood at nearly its pace (lab, 10,000
            # frames/s: 236-310 probes lost in 7 of 9 runs, where a paced
            # release lost none).  The bound is flow control's.
            bound = min(deadline, self.flow_bound())
            started = time.monotonic()
            # The least the hold held, and when: a VM that gains on its
            # backlog is given until the bound; one that has not for
            # FLOW_STUCK_S cannot keep up with its traffic, and a longer
            # hold only delays what it reads.
            least, least_t = float("inf"), started
            # (the backlog is asked once a step: each ask opens a netlink
            # socket, 21% of the agent's CPU under a flood at every 5 ms)
            while (backlog := (await asyncio.to_thread(h.rx_backlog))[0]) or \
                    not await asyncio.to_thread(h.rx_done):
                now = time.monotonic()
                if backlog < least:
                    least, least_t = backlog, now
                if now >= bound or now - least_t > FLOW_STUCK_S:
                    self.st.hold_timed_out = True
                    why = ("it no longer gained on them" if now < bound else "the bound was reached")
                    self.st.hold_notes.append(f"the VM had not taken the held frames {now - started:.1f} s "
                                           f"into their release ({why}): released the rest at once")
                    await asyncio.to_thread(h.release_rx_now)
                    break
                await _next_step(dn)
                await self._window_step(dn, h)

    async def release_in_order(self, deadline: float) -> None:
        """Strict ordering, once no forwarded frame is still due: the live
        frames go in after the VM has read every forwarded one."""
        while self.st.running and not self.replay.replay_read() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        await self.unpin_queues(deadline, UNPIN_SETTLE_S)
        await self.release_rx(deadline)

    def settled(self) -> None:
        """The source expects no more frames to forward (strict ordering;
        it still lingers, and a straggler is replayed behind live frames and
        counted as reordered): the held live frames may go in as soon as the
        forwarded ones are read, bounded like flow control."""
        if self.st.strict and self.st.running and self.strict_release is None:
            self.strict_release = self.io.task(self.release_in_order(self.flow_bound()), "settled release")

    async def flow_control(self) -> None:
        """Without strict ordering: the live frames held since the park go in
        as the VM's ring has room (pacing.py), and so do the ones
        that keep coming, until the session ends (then the hold goes) or
        the hold's time bound after the resume (then the rest goes at once,
        and the report says so).  A VM that reads fast empties the hold and
        the frames pass almost straight.

        The live frames start only once the VM has read what was replayed:
        the ring is one FIFO, the agent keeps it half full while it replays,
        and a paced release on top of that left the VM's stalls (a busy
        core) to overflow the rest (lab, the flood with a busy core: 5 and
        27 probes lost in 2 of 9 runs; 0 in 8 runs since).  The VM reads
        no less for it; the replay, older, just goes first."""
        while not self.st.finishing and not self.expired() and not self.replay.replay_read():
            await asyncio.sleep(RELEASE_STEP_S / 4)
        if self.st.finishing:
            return
        async with self.lock:
            holds = [(dn, dn.hold) for dn in self.st.nics if dn.hold is not None and not dn.hold.removed]
            for dn, h in holds:
                await self._start_window(dn, h, keep=True)
                log.info("session=%s flow control: %d live frame(s) held, going in as the VM's ring has room",
                         self.st.sid, h.stats.held_rx)
            while not self.st.finishing:
                if self.expired():
                    self.st.hold_timed_out = True
                    self.st.hold_notes.append(f"hold bound of {self.st.hold_timeout_ms} ms after the resume reached "
                                           "while the VM read the held frames: the rest went in at once")
                    for _dn, h in holds:
                        await asyncio.to_thread(h.release_rx_now)
                    return
                await _next_step(holds[0][0] if holds else None)
                for dn, h in holds:
                    await self._window_step(dn, h)

    async def _start_window(self, dn: DestNic, h: holdmod.Hold, keep: bool) -> None:
        """Start the windowed release of ``dn``'s held live frames (a release
        that flow control started goes on)."""
        if dn.window is None:
            frames = release_window(self.replay.gauge(dn), dn.orig_qlen or 500)
            dn.window = Window(granted=frames, entered0=dn.live_enqueued)
            await asyncio.to_thread(h.release_rx, frames, keep)

    async def _window_step(self, dn: DestNic, h: holdmod.Hold) -> None:
        """One step of a windowed release: the ring's level, and a new window
        once the last one is used (grant_needed).  What the hold let through
        is what entered the tap since the grant (counted in the kernel: no
        netlink read a step, which took 3-7 ms of a 10 ms step with a
        30,000 frames/s flood).  Only a window not half used asks the
        hold whether frames wait behind it (ask_hold)."""
        w = dn.window
        if w is None:
            return
        w.step_t = now = time.monotonic()
        if h.stats.rx_released_t is not None:
            return
        ring = dn.orig_qlen or 500
        level = self.replay.gauge(dn)  # (counts what entered the tap)
        entered = dn.live_enqueued
        frames = release_window(level, ring)
        due = grant_needed(frames, ring, entered - w.entered0, w.granted)
        if not due and frames >= window_min(ring) and ask_hold(w, entered, now):
            w.asked_t, w.idle = now, (await asyncio.to_thread(h.rx_backlog))[0] == 0
            due = not w.idle
        w.entered_step = entered
        if due:
            w.granted, w.entered0, w.idle = frames, entered, False
            await asyncio.to_thread(h.grant_rx, frames)

    async def _remove_locked(self) -> None:
        for dn in self.st.nics:
            h = dn.hold
            if h is None or h.removed:
                continue
            if h.mirror_fd is not None:
                try:
                    asyncio.get_running_loop().remove_reader(h.mirror_fd)
                except (RuntimeError, ValueError):
                    pass
            try:
                await asyncio.to_thread(h.remove, self.st.running)
            except NetpassError as exc:
                self.st.hold_notes.append(str(exc))
                log.error("session=%s %s", self.st.sid, exc)
            h.stop_guard()  # the hold object stays: its counts go in the report

    # -- the session's steps -------------------------------------------------------------
    async def step(self) -> None:
        """One round of the session's feeder: with strict ordering, the hold's
        timeout and the guest's held transmissions; without it, flow control
        from the VM's resume on."""
        st = self.st
        if st.strict:
            if st.hold_closed and self.expired() and not st.hold_timed_out:
                st.hold_timed_out = True
                past_resume = (st.resume_t is not None and
                               time.monotonic() > st.resume_t + st.hold_timeout_ms / 1000)
                why = (f"hold timeout of {st.hold_timeout_ms} ms reached" if past_resume else
                       "the kernel hold is tight only for a few seconds and the VM has not resumed")
                st.hold_notes.append(f"{why}: released everything; later forwarded frames "
                                     "may be overtaken")
                log.warning("session=%s hold timeout: releasing", st.sid)
                await self.release_rx(time.monotonic() + 5)
            await self.release_tx_when_ready()
        elif st.running and st.hold_closed and self.flow_release is None:
            # Flow control: live frames go in at the pace the VM reads, from now on.
            self.flow_release = self.io.task(self.flow_control(), "paced release")

    async def stop_mirrors(self) -> None:
        """The source is done: no frame of it can be a duplicate any more."""
        if not self.st.strict:
            for dn in self.st.nics:
                if dn.hold is not None and not dn.hold.removed:
                    await asyncio.to_thread(dn.hold.stop_mirror)

    async def finish(self, deadline: float) -> None:
        """The source is done: what the holds still have goes in, and they go."""
        st = self.st
        if st.strict:
            if self.strict_release is not None:  # the source settled earlier: it runs
                await self.strict_release
            # Now, with the source done, every forwarded frame is in.
            await self.release_in_order(deadline)
            await self.remove()
        elif st.holding():
            st.finishing = True
            if self.flow_release is not None:
                try:
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(self.flow_release)
                except TimeoutError:
                    pass
            # What the hold still has goes in at the VM's pace while the VM
            # gains on it, then it goes.
            await self.release_rx(deadline)
            await self.unpin_queues(deadline)
            await self.remove()


async def _next_step(dn: DestNic | None) -> None:
    """Until a release's next step: RELEASE_STEP_S after its last one began
    (a step's own work is inside its period, not added to it)."""
    last = dn.window.step_t if dn is not None and dn.window is not None else time.monotonic()
    await asyncio.sleep(max(0.001, last + RELEASE_STEP_S - time.monotonic()))
