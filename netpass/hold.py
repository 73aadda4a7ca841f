"""The strict-ordering hold on a destination tap: held in the kernel, released in order.

Both directions of the destination VM's traffic are steered by tc filters on
the tap's clsact qdisc into an ifb device each, whose root qdisc is a plug
(a token bucket at a few bytes per second, emptied by two primer frames):

* **live RX** (the network toward the VM): the tap's *egress* filter.  The
  ifb hands each frame back to the tap's transmit path, past the filter, into
  the tap's ring.  netpass replays with ``PACKET_QDISC_BYPASS``, which skips
  the filter, so forwarded frames go straight into the ring, ahead of
  everything held.
* **guest TX** (the VM toward the network): the tap's *ingress* filter.  The
  ifb hands each frame back to the tap's receive path, so a released frame
  enters the host exactly as if it had never been held: same device, same
  bridge learning.

Releasing is a ``tc qdisc change`` on the FIFO the live frames keep entering,
so nothing overtakes a held frame at the hand-over; the filter goes only once
the FIFO is empty.  (A parking tap drained by Python, the other way, leaves a
window when its steering rule goes: frames still parked are passed by new ones
going direct.)  RX is released paced, in the kernel: tun drops what does not
fit its ring, and a guest answering a large burst at once runs out of buffer
(seen).  The tap's own root qdisc is never touched: replacing or deleting a
qdisc deactivates the device for a moment and drops frames (seen: 7 at 4,000
pps), which is also why the clsact netpass adds before the VM runs stays.

Lifecycle: :meth:`Hold.install` (the path exists, open) -> :meth:`close`
(at the source's stop) -> :meth:`release_tx` -> :meth:`release_rx` until
:meth:`rx_done` -> :meth:`remove`.  What it changed is recorded in a state
file; a guard process undoes the hold if the agent dies, and a restarted
agent undoes what a dead one left (:func:`recover`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from . import holdguard, links, procs, rps, tapfd, tc
from .errors import KernelError, NetpassError, UsageError
from .packet import Injector

log = logging.getLogger(__name__)

HANDLE = "6e70:"  # "np"
PREF = 0x6E70
PASS_PREF = PREF - 1
MIRROR_PREF = PREF - 2  # flow control: the copying filter, ahead of the plain redirect
RARP = 0x8035  # QEMU's own announcement after the resume
IFB_PREFIX = "npifb"
MIRROR_PREFIX = "npmir"
# Pace of a release nobody measured for (guard, restarted agent): the lab's
# TCG guest takes this rate comfortably.
FALLBACK_RELEASE_FPS = 5000
# The held transmissions leave in windows (_release_tx_windows): the ifb
# passes them to the receive path, where RPS (see _steer_rx_per_flow) queues
# a flow's frames in one CPU's input backlog, and that backlog drops past
# net.core.netdev_max_backlog (1,000 by default).  Let go at once, a strict
# hold of 1,443 held transmissions lost 608 of them there, with nothing in
# the report (lab, strict, 4,000 probes/s, a 400 ms pause: 1 run in 4).  A
# fixed pace (100,000 frames/s) was not enough either: on a host whose
# softirqs share a busy core, 66-888 of 4,000 frames released through five
# veth hops were dropped in 7 of 8 releases (a fresh-clone CI; here, 3 runs
# of 4 lost 240-627 in one or two of their 8 releases).  So a window goes
# only once the CPUs' backlogs have room for it: a window is half the
# limit, and goes once every CPU's backlog holds a quarter of it at most (a
# quarter left for other traffic).  A window costs a tc change (2-7 ms).
TX_WINDOW_SHARE = 2  # a window: netdev_max_backlog / 2 frames (500)
TX_ROOM_SHARE = 4  # the next one once the backlogs hold netdev_max_backlog / 4 at most
TX_WINDOW_MIN = 16
TX_WINDOW_WAIT_S = 0.05  # a window waits this long at most for the backlogs
TX_RELEASE_FPS = 100_000  # the pace between windows where the kernel shows no backlogs
TX_RELEASE_BURST = 64  # held transmissions this few leave at once
PRIMER_TYPE = b"\x88\xb5"  # IEEE local experimental EtherType
PRIMER_DST = bytes.fromhex("026e70fffffe")
PRIMER_SRC = bytes.fromhex("026e70fffffd")


def net_ns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


@dataclass
class HoldSpec:
    """What a hold changed: enough to undo it from another process."""

    session: str
    tap: str
    ifb_rx: str
    ifb_tx: str
    burst: int
    limit: int
    owner_pid: int
    netns: int
    mirror: str = ""
    made_clsact: bool = False
    phase: str = "installing"
    guard_pid: int | None = None
    # [QEMU's pid, one of its fds of the tap]: the tap's queues are pinned to
    # one (destflow.Holds.pin_queue), to be given back by whoever undoes the hold.
    queue_pin: list[int] | None = None
    # The tap's receive steering before the hold steered it to rps_cpus (TX
    # held only): queue -> CPU mask, to be given back.
    rps_saved: dict[str, str] | None = None
    rps_cpus: list[int] | None = None

    @classmethod
    def load(cls, path: Path) -> HoldSpec:
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class HoldStats:
    held_rx: int = 0
    held_tx: int = 0
    dropped_rx: int = 0
    dropped_tx: int = 0
    closed_t: float | None = None
    tx_released_t: float | None = None
    rx_release_started_t: float | None = None
    rx_released_t: float | None = None
    late: bool = False
    notes: list[str] = field(default_factory=list)
    # The hold opened because the VM had caught up with it (its backlog
    # empty; not a timeout): when, and the tap's drop counter then.  From
    # there the VM takes its traffic as it would without netpass.
    rx_caught_up_t: float | None = None
    tap_dropped_caught_up: int | None = None
    # Frames the CPUs' input backlogs dropped, host-wide, while the held
    # transmissions left (see release_tx): the VM's, most likely.
    backlog_dropped: int = 0


class Primers:
    """netpass's own frames through an ifb's qdisc, which the ifb drops after
    (it only passes on what tc redirected to it): two empty a plug's bucket,
    one wakes a bucket's qdisc.  One socket per ifb, kept until :meth:`close`:
    closing an AF_PACKET socket waits for an RCU grace period
    (packet_release -> synchronize_net), 13-20 ms here, which made closing a
    strict hold take 30-60 ms, longer than a fast switchover (the VM resumed
    first)."""

    def __init__(self, burst: int) -> None:
        head = PRIMER_DST + PRIMER_SRC + PRIMER_TYPE
        body = b"netpass hold primer"
        self.frames = [head + body.ljust(burst - 64 - 14, b"\0"), head + body.ljust(64 - 14, b"\0")]
        self._senders: dict[str, Injector] = {}
        self.sent: dict[str, int] = {}  # ifb -> primers sent into it

    def open(self, ifb: str) -> Injector:
        if ifb not in self._senders:
            self._senders[ifb] = Injector(ifb, vnet_hdr=False, bypass=False)
        return self._senders[ifb]

    def send(self, ifb: str, frames: list[bytes]) -> None:
        sender = self.open(ifb)
        for f in frames:
            if not sender.send(b"", f):
                raise KernelError(f"{ifb} refused a frame of netpass's own")
            self.sent[ifb] = self.sent.get(ifb, 0) + 1

    def empty(self, ifb: str) -> None:
        """Both primers: a plug's bucket is empty after them."""
        self.send(ifb, self.frames)

    def kick(self, ifb: str) -> None:
        """A ``tc change`` refills the bucket but does not wake the qdisc,
        whose timer may be minutes away; an arriving frame does.  It waits
        behind the frames held before it, and takes a place in the window
        that reaches it."""
        self.send(ifb, self.frames[1:])

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _serial(method: Callable[Concatenate[Hold, _P], _R]) -> Callable[Concatenate[Hold, _P], _R]:
    """One kernel operation on a hold at a time, whatever the thread.

    The agent runs them in worker threads; a task cancelled while its
    thread works (the session ending under a release) leaves that thread
    running, and the removal then ran beside it: both on the one netlink
    socket that reads the qdiscs, both changing the same plug and filters."""
    def serial(self: Hold, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)
    functools.update_wrapper(serial, method)
    return serial


class Hold:
    def __init__(self, spec: HoldSpec, state_dir: Path) -> None:
        self._lock = threading.RLock()  # see _serial
        self.spec = spec
        self.path = state_dir / f"{spec.session}-{spec.tap}.json"
        self.stats = HoldStats()
        self.removed = False
        self._base_drops = {i: 0 for i in (spec.ifb_rx, spec.ifb_tx) if i}
        self._guard: subprocess.Popen[bytes] | None = None
        self.mirror_fd: int | None = None
        self.qdiscs = tc.QdiscReader(None)  # polled while held frames leave; closed by remove()
        self.counters = links.StatsReader(None)  # the ifbs' counters, polled likewise
        self._emptied_t = 0.0  # when an opened ifb was last seen empty (_unsteer)
        self.primers = Primers(spec.burst)  # (their sockets kept until remove())
        self._own_base: dict[str, int] = {}  # ifb -> its rx_dropped before any primer (own_queued)

    # -- state file ---------------------------------------------------------------------
    def _save(self, phase: str | None = None) -> None:
        if phase:
            self.spec.phase = phase
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.spec)))
        os.replace(tmp, self.path)

    # -- install ------------------------------------------------------------------------
    @classmethod
    def install(cls, session: str, tap: str, state_dir: Path, limit: int, hold_timeout_ms: int,
                tx: bool = True) -> Hold:
        """Put the (open) hold path in place on ``tap``; nothing is held yet.
        ``tx``: hold the VM's transmissions too (strict ordering); without
        it only live frames toward the VM are held (flow control)."""
        burst = _burst_for(tap, hold_timeout_ms)
        rnd = os.urandom(3).hex()
        spec = HoldSpec(session=session, tap=tap, ifb_rx=f"{IFB_PREFIX}{rnd}r",
                        ifb_tx=f"{IFB_PREFIX}{rnd}t" if tx else "",
                        mirror=f"{MIRROR_PREFIX}{rnd}", burst=burst, limit=limit, owner_pid=os.getpid(),
                        netns=net_ns_id())
        hold = cls(spec, state_dir)
        hold._save("installing")  # before the first change: a crash from here on is undone
        try:
            # A copy of each held live frame, as it is held: the agent must know
            # what the network delivered here to not replay it a second time.
            # Our fd is its only owner: it goes when we do.
            hold.mirror_fd = tapfd.open_tap(spec.mirror)
            os.set_blocking(hold.mirror_fd, False)
            links.set_up(None, spec.mirror)
            for ifb in hold.ifbs:
                links.add_ifb(None, ifb)
                tc.tbf_open(None, ifb, HANDLE, limit, op="add")
                hold.primers.open(ifb)  # opened now, not at the close
                hold._own_base[ifb] = hold.counters.stats(ifb).get("rx_dropped", 0)
            try:
                tc.add_clsact(None, tap)
                spec.made_clsact = True
            except KernelError:
                # A clsact (or ingress) qdisc is already there: libvirt adds one
                # for bandwidth limits.  Our filters join it, with our preference.
                pass
            hold._save()
            if spec.ifb_tx:
                hold._steer_rx_per_flow()
            _redirect(spec)
        except NetpassError:
            hold.remove()
            raise
        hold._save("open")
        log.info("hold installed on %s via %s", tap, " and ".join(hold.ifbs))
        return hold

    def _steer_rx_per_flow(self) -> None:
        """What the host receives from the tap, to a CPU per flow: a released
        TX burst keeps its order (see :mod:`netpass.rps`).  Done at the
        install, before the destination VM sends anything."""
        saved = rps.masks(None, self.spec.tap)
        if not saved:
            self.stats.notes.append("this kernel has no receive packet steering: a released burst of the "
                                    "VM's transmissions may be reordered across CPUs")
            return
        cpus = rps.steering_cpus()
        self.spec.rps_saved, self.spec.rps_cpus = saved, cpus
        self._save()  # first: a crash in between leaves a harmless write to undo
        rps.set_masks(None, self.spec.tap, {q: rps.cpu_mask(cpus) for q in saved})

    def _give_rx_steering_back(self) -> None:
        """Once the steering CPUs' backlogs have been empty (nothing left
        there for frames processed elsewhere to overtake), or after 50 ms."""
        spec = self.spec
        if spec.rps_saved is None:
            return
        if not rps.wait_backlogs_empty(spec.rps_cpus or [], 0.05):
            log.info("CPU backlogs did not empty in 50 ms; giving %s its receive steering back anyway", spec.tap)
        rps.set_masks(None, spec.tap, spec.rps_saved)
        spec.rps_saved = spec.rps_cpus = None
        if not self.removed:
            self._save()

    @property
    def ifbs(self) -> list[str]:
        return [i for i in (self.spec.ifb_rx, self.spec.ifb_tx) if i]

    # -- close --------------------------------------------------------------------------
    def _plug(self, ifb: str) -> None:
        """Turn ``ifb``'s open bucket into a plug, then empty the bucket."""
        before = self.qdiscs.root(ifb)
        self._base_drops[ifb] = before.drops if before else 0
        tc.tbf_plug(None, ifb, HANDLE, self.spec.burst, self.spec.limit, op="change")
        # A frame that comes between the change and the primers takes some
        # of the bucket, and a primer then waits in the queue: the plug
        # still holds (what is left of the bucket is less than that primer),
        # and the first window carries it (release_rx, own_queued).  A
        # primer the qdisc refused makes send() raise.
        self.primers.empty(ifb)

    @property
    def tight_s(self) -> float:
        """How long after closing the plug is sure to hold everything."""
        return 0.8 * tc.plug_leaks_after_s(self.spec.burst)

    @_serial
    def close(self) -> None:
        """Hold from now on: live RX toward the VM (and the VM's TX, if held)."""
        if self.spec.ifb_tx:
            self._plug(self.spec.ifb_tx)
        self._plug(self.spec.ifb_rx)
        self.stats.closed_t = time.monotonic()
        self._save("closed")

    # -- release ------------------------------------------------------------------------
    def _backlog(self, ifb: str) -> tuple[int, int]:
        q = self.qdiscs.root(ifb)
        if q is None:
            return 0, 0
        return q.backlog_packets, q.backlog_bytes

    def _drops(self, ifb: str) -> int:
        q = self.qdiscs.root(ifb)
        return max(0, q.drops - self._base_drops[ifb]) if q is not None else 0

    def _unsteer(self, ifb: str, direction: str) -> None:
        """Stop steering once ``ifb`` holds nothing: from then on frames go
        straight, after the last one that went through it.

        Empty means its qdisc *and* its own queue: the ifb passes frames on
        from a tasklet, so a large release is still in there for a while
        after the qdisc has emptied (seen: 32 replies overtaken).
        """
        self._drain_wait(ifb, 2.0)
        self._emptied_t = time.monotonic()
        if direction == "egress":
            self.stop_mirror()
        tc.del_filter(None, self.spec.tap, direction, PREF)
        if direction == "ingress":
            try:  # (listing first was one more tc run each time: 2-7 ms on a busy core)
                tc.del_filter(None, self.spec.tap, direction, PASS_PREF)
            except KernelError:
                if PASS_PREF in tc.filter_prefs(None, self.spec.tap, direction):
                    raise

    def _open(self, ifb: str, direction: str, caught_up: bool = False) -> int:
        """Open ``ifb``'s plug (held frames leave first, in order), stop
        steering once it is empty; what its queue dropped meanwhile.
        ``caught_up``: RX, opened because the VM caught up with the hold."""
        if direction == "egress" and caught_up:
            self.stats.tap_dropped_caught_up = links.info(None, self.spec.tap).tx_dropped
            self.stats.rx_caught_up_t = time.monotonic()
        tc.tbf_open(None, ifb, HANDLE, self.spec.limit)
        self.primers.kick(ifb)
        self._unsteer(ifb, direction)
        return self._drops(ifb)

    @_serial
    def release_tx(self) -> None:
        """Let the VM's held transmissions out, in order, and stop steering them."""
        if self.stats.tx_released_t is not None:
            return
        if not self.spec.ifb_tx:
            self.stats.tx_released_t = time.monotonic()
            return
        ifb = self.spec.ifb_tx
        t0 = time.monotonic()
        held = self._backlog(ifb)[0]
        self.stats.held_tx = held
        drops0 = rps.backlog_drops()
        if held > TX_RELEASE_BURST:
            self._release_tx_windows(ifb, held)
        self.stats.dropped_tx = self._open(ifb, "ingress")
        # Released once the open ifb was empty: the VM's frames flow from
        # then on; taking the filters away after that holds nothing.
        self.stats.tx_released_t = self._emptied_t
        log.debug("%s: %d held transmissions released; flowing after %.1f ms, its filters gone after %.1f ms",
                  self.spec.tap, held, (self._emptied_t - t0) * 1e3, (time.monotonic() - t0) * 1e3)
        drops1 = rps.backlog_drops()
        if drops0 is not None and drops1 is not None and drops1 > drops0:
            self.stats.backlog_dropped = drops1 - drops0
            self.stats.notes.append(
                f"the CPUs' input backlogs dropped {drops1 - drops0} frame(s) on this host while the "
                f"{held} held transmissions of {self.spec.tap} left (net.core.netdev_max_backlog): "
                "most likely the VM's")
        self._save("tx_released")

    def _release_tx_windows(self, ifb: str, held: int) -> None:
        """Let ``ifb``'s held frames into the receive path a window at a
        time, each once the CPUs' backlogs have room for it, until a window
        or less is left (the caller opens the ifb for those).  Bounded: past
        1 s + 1 ms per held frame, the rest goes at once."""
        limit = rps.max_backlog()
        window = max(TX_WINDOW_MIN, limit // TX_WINDOW_SHARE)
        seen = rps.backlogs()  # {}: the kernel does not show them; a pace between windows instead
        cpus = self.spec.rps_cpus or sorted(seen)
        start = time.monotonic()
        deadline = start + 1.0 + held / 1000
        windows = 0
        while (left := self._backlog(ifb)[0]) > window and time.monotonic() < deadline:
            tc.tbf_allow(None, ifb, HANDLE, window, self.frame_max, self.spec.limit)
            self.primers.kick(ifb)
            windows += 1
            # Out of the ifb's queue (a frame or two less than the window
            # may pass: the bucket's rounding; seen 249 of 250), then room
            # in the backlogs.
            until = time.monotonic() + TX_WINDOW_WAIT_S
            while self._backlog(ifb)[0] > left - window + window // 16 and time.monotonic() < until:
                time.sleep(0.0005)
            if seen:
                rps.wait_backlogs_at_most(cpus, limit // TX_ROOM_SHARE, TX_WINDOW_WAIT_S)
            else:
                time.sleep(window / TX_RELEASE_FPS)
        if self._backlog(ifb)[0] > window:
            log.warning("%s: the held transmissions did not leave in windows in time; the rest goes at once", ifb)
        log.debug("%s: %d held transmissions left in %d window(s) of %d in %.1f ms", ifb, held, windows, window,
                  (time.monotonic() - start) * 1e3)

    @_serial
    def stop_mirror(self) -> None:
        """Flow control: stop copying the held frames (the plain redirect
        behind the copying filter takes them, in the same order)."""
        if not self.spec.ifb_tx and MIRROR_PREF in tc.filter_prefs(None, self.spec.tap, "egress"):
            tc.del_filter(None, self.spec.tap, "egress", MIRROR_PREF)

    @_serial
    def rx_backlog(self) -> tuple[int, int]:
        return self._backlog(self.spec.ifb_rx)

    @_serial
    def release_rx(self, frames: int, keep: bool = False) -> None:
        """Start letting the held live frames into the tap, in order, in
        windows: ``frames`` now, then what :meth:`grant_rx` allows (the
        agent's release, pacing.py); with ``keep`` the hold stays even
        when it holds nothing (flow control: frames keep coming through it)."""
        if self._begin_rx(keep):
            self.grant_rx(frames + self.own_queued(self.spec.ifb_rx))

    def own_queued(self, ifb: str) -> int:
        """netpass's own frames in ``ifb``'s queue: the primers sent into it
        less those its qdisc let by, which the ifb then dropped (it drops
        what tc did not redirect to it, and counts it in rx_dropped; it says
        nothing of its own: links.add_ifb).  Before the first window these
        are the close's primers that a frame just before them kept waiting
        (_plug), near the head of the queue: the window carries them on top
        of the frames it grants (CI: 8 of 10 frames went in, the other two
        places went to the primers).  Later, kicks wait at the tail, and
        are not counted.  0 for a hold loaded from its file."""
        sent = self.primers.sent.get(ifb, 0)
        base = self._own_base.get(ifb)
        if not sent or base is None:
            return 0
        passed = self.counters.stats(ifb).get("rx_dropped", 0) - base
        return min(sent, max(0, sent - passed))

    def _begin_rx(self, keep: bool) -> bool:
        """A release's start: what it holds, counted.  False: nothing to
        release (a release started already, or an empty hold opened)."""
        if self.stats.rx_released_t is not None or self.stats.rx_release_started_t is not None:
            return False
        self.stats.held_rx = pkts = self.rx_backlog()[0]
        self.stats.rx_release_started_t = time.monotonic()
        if pkts == 0 and not keep:
            self._open_rx(caught_up=True)
            return False
        self._save("releasing")
        return True

    @_serial
    def grant_rx(self, frames: int) -> None:
        """Let ``frames`` more held frames through (at least one), then hold
        again: a window (tc.tbf_allow).  The frame that wakes the qdisc
        (Primers.kick) takes a place in it only if nothing waits before it."""
        if self.stats.rx_released_t is not None:
            return
        tc.tbf_allow(None, self.spec.ifb_rx, HANDLE, frames, self.frame_max, self.spec.limit)
        self.primers.kick(self.spec.ifb_rx)

    @property
    def frame_max(self) -> int:
        """The tap's MTU and Ethernet header: the spec's burst less its room
        for tags (_burst_for)."""
        return self.spec.burst - tc.TAG_ROOM

    @_serial
    def release_all(self, window: int, bound_s: float) -> None:
        """Release both directions, RX ``window`` frames every 5 ms, and wait
        up to ``bound_s`` for the held frames to be in (a check's or a
        test's release; the agent's windows follow the VM's ring)."""
        self.release_tx()
        self.release_rx(window)
        deadline = time.monotonic() + bound_s
        while not self.rx_done() and time.monotonic() < deadline:
            time.sleep(0.005)
            self.grant_rx(window)

    @_serial
    def release_rx_now(self) -> None:
        """Let the rest of the held live frames go at once (a timeout)."""
        if self.stats.rx_released_t is None:
            self._open_rx()

    @_serial
    def rx_done(self) -> bool:
        """True once the held live frames are all in the tap (steering then stops)."""
        if self.stats.rx_released_t is not None:
            return True
        if self.rx_backlog()[0]:
            return False
        self._open_rx(caught_up=True)
        return True

    def _open_rx(self, caught_up: bool = False) -> None:
        self.stats.dropped_rx = self._open(self.spec.ifb_rx, "egress", caught_up)
        self.stats.rx_released_t = time.monotonic()
        self._save("released")

    def _drain_wait(self, ifb: str, bound_s: float) -> None:
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            if self._backlog(ifb)[0] == 0:
                st = self.counters.stats(ifb)
                # What it took in (less our own frames, which it drops at
                # once) against what it passed on or dropped.
                if st["tx_packets"] + st["tx_dropped"] >= st["rx_packets"] - st["rx_dropped"]:
                    return
            time.sleep(0.001)

    # -- remove -------------------------------------------------------------------------
    # -- the tap's queue choice ----------------------------------------------------------
    @_serial
    def pin_queue(self, fd: int, qemu_pid: int, qemu_fd: int) -> None:
        """Every frame toward the VM to queue 0 (``fd``: our copy of one of
        the tap's fds), until unpin_queue() or remove(), from any process."""
        self.spec.queue_pin = [qemu_pid, qemu_fd]
        self._save()  # first: a crash in between leaves a harmless reset to do
        tapfd.steer_to_queue(fd, 0)

    @_serial
    def unpin_queue(self, fd: int | None = None) -> None:
        """The tap chooses its queues itself again (``fd`` ours, or taken from QEMU)."""
        pin = self.spec.queue_pin
        if not pin:
            return
        if fd is not None:
            tapfd.steer_automatically(fd)
        else:
            pidfd = None
            try:
                pidfd = tapfd.pidfd_open(pin[0])
                theirs = tapfd.pidfd_getfd(pidfd, pin[1])
            except (OSError, NetpassError):
                theirs = None  # QEMU is gone, and its tap with it
            finally:
                if pidfd is not None:
                    os.close(pidfd)
            if theirs is not None:
                try:
                    tapfd.steer_automatically(theirs)
                finally:
                    os.close(theirs)
        self.spec.queue_pin = None
        if not self.removed:
            self._save()

    @_serial
    def remove(self, vm_running: bool = True) -> None:
        """Undo everything this hold changed, releasing what it still holds.

        The clsact qdisc netpass added stays, empty, while the VM may be
        running: adding or deleting a qdisc deactivates the device for a
        moment and drops what arrives meanwhile (seen: up to 9 frames at
        4,000 pps).  An empty clsact costs nothing and goes with the tap.
        Idempotent, and works from another process (guard, restarted agent).
        """
        spec = self.spec
        errors: list[str] = []

        def attempt(what: str, fn: object, *args: object) -> None:
            try:
                fn(*args)  # type: ignore[operator]
            except NetpassError as exc:
                errors.append(f"{what}: {exc}")

        tap_there = links.exists(None, spec.tap)
        filters_left: list[str] = []
        for ifb, direction, paced in ((spec.ifb_tx, "ingress", False), (spec.ifb_rx, "egress", True)):
            if not ifb and direction == "ingress":
                continue  # (flow control holds no TX)
            ifb_there = bool(ifb) and links.exists(None, ifb)
            if ifb_there and tap_there and PREF in tc.filter_prefs(None, spec.tap, direction):
                # Held frames leave first, in order (RX paced), then the filter goes.
                if paced and self.stats.rx_release_started_t is None and self._backlog(ifb)[0]:
                    attempt("release the held RX", self.release_rx, FALLBACK_RELEASE_FPS)
                    deadline = time.monotonic() + 10
                    while self._backlog(ifb)[0] and time.monotonic() < deadline:
                        time.sleep(0.005)
                attempt(f"open {ifb} and remove the {direction} filter", self._open, ifb, direction)
            if tap_there:
                # Whatever stopped the ordered way, no redirect of ours may
                # outlive the ifb it points to: the tap would drop every frame.
                left = self._sweep_filters(direction, errors)
                filters_left += [f"{direction} filter {pref}" for pref in sorted(left)]
            if not ifb_there:
                continue
            if (held := self._backlog(ifb)[0]):
                errors.append(f"{held} held frame(s) on {ifb} did not leave in time and are dropped")
            attempt(f"delete {ifb}", links.delete, None, ifb)
        if tap_there and spec.made_clsact and not vm_running and \
                any(q.kind == "clsact" for q in tc.qdiscs(None, spec.tap)):
            if not tc.filter_prefs(None, spec.tap, "ingress") and not tc.filter_prefs(None, spec.tap, "egress"):
                attempt("remove clsact", tc.del_clsact, None, spec.tap)
        if tap_there:
            attempt("give the tap its receive steering back", self._give_rx_steering_back)
        attempt("give the tap its queue choice back", self.unpin_queue)
        self.close_mirror()
        self.primers.close()
        self.qdiscs.close()
        self.counters.close()
        if filters_left:
            # Kept: the agent's next start (recover) tries again.
            errors.append(f"{', '.join(filters_left)} still on {spec.tap}: its state file "
                          f"{self.path} stays for the agent's next start")
        else:
            self.path.unlink(missing_ok=True)
        self.removed = True
        if errors:
            raise KernelError(f"undoing the hold on {spec.tap}: " + "; ".join(errors))
        log.info("hold on %s removed", spec.tap)

    def _sweep_filters(self, direction: str, errors: list[str]) -> set[int]:
        """Delete any filter of ours still on the tap in ``direction`` (the
        copying one first), listing them up to three times; the preferences
        still there (all of ours if they cannot be listed)."""
        ours = {MIRROR_PREF, PASS_PREF, PREF}
        left = ours
        for listing in range(3):
            try:
                left = ours & tc.filter_prefs(None, self.spec.tap, direction, missing_ok=False)
            except KernelError as exc:
                errors.append(f"list the {direction} filters: {exc}")
                left = ours
                continue
            if not left or listing == 2:
                break
            for pref in sorted(left):  # MIRROR_PREF < PASS_PREF < PREF
                try:
                    tc.del_filter(None, self.spec.tap, direction, pref)
                except KernelError as exc:
                    errors.append(f"remove the {direction} filter {pref}: {exc}")
        return left

    def read_mirror(self, limit: int = 4096) -> list[bytes]:
        """The live frames held since the last call (copies)."""
        out: list[bytes] = []
        if self.mirror_fd is None:
            return out
        while len(out) < limit:
            try:
                out.append(os.read(self.mirror_fd, 65_600))
            except BlockingIOError:
                break
        return out

    def close_mirror(self) -> None:
        if self.mirror_fd is not None:
            os.close(self.mirror_fd)
            self.mirror_fd = None

    # -- guard --------------------------------------------------------------------------
    def start_guard(self) -> None:
        """A separate process that undoes the hold if this agent dies (``holdguard.py``)."""
        self._guard = holdguard.start(self.path, os.getpid())
        self.spec.guard_pid = self._guard.pid
        self._save()

    def stop_guard(self) -> None:
        if self._guard is not None:
            holdguard.stop(self._guard)  # it leaves once the state file is gone
            self._guard = None


def _burst_for(tap: str, hold_timeout_ms: int) -> int:
    """The plug's bucket for ``tap``: room for its largest frame and 64
    bytes of tags (two primers empty it); a UsageError if the plug would
    not stay tight for ``hold_timeout_ms``, or the tap has a hold already."""
    info = links.info(None, tap)
    burst = info.mtu + 14 + tc.TAG_ROOM
    leak_s = tc.plug_leaks_after_s(burst)
    if hold_timeout_ms / 1000 > 0.8 * leak_s:
        raise UsageError(f"--hold-timeout-ms {hold_timeout_ms} is too long for tap {tap} (MTU "
                         f"{info.mtu}): the kernel hold is only tight for {0.8 * leak_s:.1f} s")
    for direction in ("ingress", "egress"):
        if {PREF, PASS_PREF, MIRROR_PREF} & tc.filter_prefs(None, tap, direction):
            raise UsageError(f"tap {tap} already has an {direction} filter with preference "
                             f"{PREF}: another netpass hold is active on it")
    return burst


def _redirect(spec: HoldSpec) -> None:
    """The tap's frames into the hold's ifbs (its clsact is in place).

    QEMU's announcement is not the guest's: it goes out at once, so the
    network learns the VM's new place at the usual time; what then arrives
    here directly waits in the RX hold."""
    tap = spec.tap
    if spec.ifb_tx:
        tc.pass_protocol(None, tap, "ingress", PASS_PREF, RARP)
        tc.redirect_all(None, tap, spec.ifb_tx, "ingress", pref=PREF)
        tc.redirect_all(None, tap, spec.ifb_rx, "egress", pref=PREF, mirror=spec.mirror)
    else:
        # Flow control only: frames are copied only while the source may
        # still send some of them too (stop_mirror ends that), then held
        # uncopied: copying and reading every frame for as long as the hold
        # lasted cost a VM under a 30,000/s flood what it needed to keep up
        # (854-1,481 probes lost, against 83-148 without a hold, and 15-23
        # copying group frames only).
        tc.redirect_all(None, tap, spec.ifb_rx, "egress", pref=MIRROR_PREF, mirror=spec.mirror)
        tc.redirect_all(None, tap, spec.ifb_rx, "egress", pref=PREF)


def recover(state_dir: Path) -> list[str]:
    """Undo the holds of dead agents in this network namespace; return what was done."""
    done: list[str] = []
    if not state_dir.is_dir():
        return done
    me = net_ns_id()
    known: set[str] = set()
    for path in sorted(state_dir.glob("*.json")):
        try:
            spec = HoldSpec.load(path)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            log.warning("ignoring unreadable hold state %s: %s", path, exc)
            continue
        if spec.netns != me or procs.alive(spec.owner_pid):
            known |= {i for i in (spec.ifb_rx, spec.ifb_tx) if i}
            continue
        try:
            Hold(spec, state_dir).remove()
            done.append(f"undid the hold of session {spec.session} on {spec.tap} ({spec.phase})")
        except NetpassError as exc:
            done.append(f"could not fully undo the hold of session {spec.session} on {spec.tap}: {exc}")
            path.unlink(missing_ok=True)
    for name in links.names(None):
        if name.startswith(IFB_PREFIX) and name not in known:
            links.delete(None, name)
            done.append(f"deleted {name}, left by a hold nobody owns")
    return done
