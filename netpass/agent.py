"""``netpass agent``: serves migration sessions on a host.

On the destination it owns a session's replay: it checks every batch,
queues frames into the destination VM's taps before the VM resumes, within
each ring's room, feeds the rest as the VM consumes them, and reports what
happened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from . import destreport, heap, links, tapfd, wire
from . import hold as holdmod
from .blocking import off_loop
from .channel import (
    BATCH,
    CONTROL,
    ERROR,
    AuthError,
    Channel,
    ChannelError,
    Wire,
    parse_hostport,
    serve,
    server_handshake,
)
from .destfeed import Replay
from .deststate import AgentConfig, DestNic, DestState
from .errors import KernelError, NetpassError, QMPError, SessionError, UsageError
from .metrics import AgentMetrics
from .nics import Nic, discover, rss_in_use
from .pacing import (
    MIN_RELEASE_FPS,
    RELEASE_STEP_S,
    Pacing,
    next_release_pace,
    repace_needed,
    vm_reading,
)
from .packet import Shadow, Tally, TxRing
from .qmp import Monitor, peer_pid
from .session import State

log = logging.getLogger(__name__)

MAX_UNAUTHENTICATED = 64
MAX_UNAUTHENTICATED_PER_ADDRESS = 8
# A session id names the hold's state files: hex only, never a path.
SESSION_ID = re.compile(r"[0-9a-f]{1,64}")


# Strict ordering, multiqueue: after the tap is given its own queue choice
# back, how long the held live frames still wait for the VM to handle what
# queue 0 holds (see _unpin_queues).
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
# A source that still sends batches this long after its VM resumed here is
# refused: its linger is bounded by 60 s (--linger-max-ms).
LATE_BATCH_BOUND_S = 90.0
# The source gone before it said the migration completed: how long the agent
# waits to see whether its VM runs here anyway (the migration completed, and
# what the agent holds is the only copy: it goes in) or not (it is dropped:
# the source gives back its own copies when the VM stays there).
SOURCE_LOST_WAIT_S = 30.0
# The arm's steps, in order; a test makes the session fail right after each
# (DestSession.fail_after) and checks that nothing is left.
ARM_STEPS = ("monitor", "checked", "fds", "ring", "tally", "holds", "shadow")
class DestSession(DestState):
    """The destination's I/O for one session: the channel to the source, the
    VM's monitor and taps; the facts it gathers are its ``DestState``."""

    def __init__(self, cfg: AgentConfig, ch: Channel, sid: str, metrics: AgentMetrics | None = None) -> None:
        super().__init__(cfg, sid)
        self.metrics = metrics
        self.ch = ch
        self.mon: Monitor | None = None
        self.feeder: asyncio.Task[None] | None = None
        self.flow_release: asyncio.Task[None] | None = None  # without strict ordering: the paced release
        self.strict_release: asyncio.Task[None] | None = None  # strict: the release once the source settled
        self.hold_lock = asyncio.Lock()  # one hold operation at a time (feeder, finish, cleanup)
        self.final_report: dict[str, Any] | None = None
        self.cpu0 = time.process_time()  # this agent process's CPU (user + system)
        # Every change the session makes is undone from here, in reverse
        # order, each step on its own: one that fails does not stop the rest.
        self.undo = AsyncExitStack()
        self.cleanup_errors: list[str] = []
        self.fail_after: str | None = None  # tests: fail the arm right after this step
        self.replay = Replay(self, ch, metrics)
        self.vm_pidfd: int | None = None

    def _vm_exited(self, pid: int) -> None:
        self._forget_vm_pidfd()
        self.vm_gone = f"the destination QEMU (pid {pid}) exited"
        log.error("session=%s %s", self.sid, self.vm_gone)

    def _forget_vm_pidfd(self) -> None:
        if self.vm_pidfd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.vm_pidfd)
            except (RuntimeError, ValueError):
                pass

    def _check_vm_alive(self) -> None:
        if self.vm_gone:
            raise SessionError("dest_vm_gone", self.vm_gone)

    def _take_nics(self, nics: list[Nic], pid: int) -> None:
        """The destination VM's tap fds, TX rings and tallies: each
        registers its undo as it is taken (in a worker thread)."""
        pidfd = tapfd.pidfd_open(pid)
        try:
            for nic in nics:
                fds: list[int] = []
                for qfd in nic.qemu_fds:  # each fd owned from the moment it is ours
                    fd = tapfd.pidfd_getfd(pidfd, qfd)
                    self._on_exit(f"closing {nic.tap}'s fd", os.close, fd)
                    fds.append(fd)
                self._step("fds")
                info = links.info(None, nic.tap)
                ring = TxRing(nic.tap)
                # (closing a packet ring waits for a grace period too: off the loop)
                self._on_exit(f"closing {nic.tap}'s TX ring", off_loop, ring.close)
                self._step("ring")
                tally = Tally(nic.tap)
                self._on_exit(f"closing {nic.tap}'s tally", off_loop, tally.close)
                self._step("tally")
                dn = DestNic(nic=nic, ring=ring, fds=fds, orig_qlen=info.txqueuelen,
                             mac_bytes=bytes.fromhex(nic.mac.replace(":", "")), tally=tally)
                self._on_exit(f"closing {nic.tap}'s counter", self._close_counter, dn)
                self.nics.append(dn)
                # The ring is used at its size: changing txqueuelen on a live
                # tap drops frames; what does not fit is fed as the VM reads.
                dn.mark_tx = dn.tx0 = info.tx_packets
                dn.tx_dropped0 = info.tx_dropped
        finally:
            os.close(pidfd)

    def _step(self, name: str) -> None:
        if self.fail_after == name:
            raise KernelError(f"failure injected after the arm step '{name}'")

    def _on_exit(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Undo ``fn(*args)`` at cleanup, guarded: an error is logged and noted."""
        async def guarded() -> None:
            try:
                res = fn(*args)
                if isinstance(res, Awaitable):
                    await res
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - the rest still runs
                self.cleanup_errors.append(f"{what}: {exc}")
                log.error("session=%s cleanup: %s failed: %s", self.sid, what, exc)
        self.undo.push_async_callback(guarded)

    # -- arming -------------------------------------------------------------------------
    def _check_qmp_path(self, path: str) -> str:
        return check_qmp_socket(path, self.cfg.qmp_root, self.cfg.qemu_uids)

    async def arm(self, req: dict[str, Any]) -> dict[str, Any]:
        dest_qmp, macs, vm = check_open(req)
        qmp_path = self._check_qmp_path(dest_qmp)
        pid = peer_pid(qmp_path)
        self.mon = Monitor(qmp_path, f"dst-{self.sid}")
        self._on_exit("closing the QMP connection", self.mon.close)
        await self.mon.connect()
        self._step("monitor")
        status = await self.mon.status()
        if status != "inmigrate":
            raise SessionError("dest_state", f"destination VM is '{status}', not waiting for an "
                               "incoming migration (-incoming)")
        await self._check_vm(vm)
        # The QEMU's exit, seen at once (its taps outlive it while we hold
        # their fds: replaying into them would look like success).
        self.vm_pidfd = tapfd.pidfd_open(pid)
        self._on_exit("closing the destination QEMU's pidfd", os.close, self.vm_pidfd)
        asyncio.get_running_loop().add_reader(self.vm_pidfd, self._vm_exited, pid)
        self._on_exit("forgetting the destination QEMU's pidfd", self._forget_vm_pidfd)
        self._step("checked")
        found = {n.mac: n for n in await discover(self.mon, pid)}
        for mac in macs:
            if mac not in found:
                raise SessionError("nic", f"the destination VM has no NIC with MAC {mac} "
                                   f"(it has {', '.join(found) or 'none'})")
        # Off the loop: a packet ring's setup waits for an RCU grace period
        # (see blocking.py), and the source's beats must still be answered.
        await off_loop(self._take_nics, [found[mac] for mac in macs], pid)
        strict = req.get("strict")
        # (Registered before they exist: a hold half installed is undone too.)
        self._on_exit("removing the holds", self._remove_holds)
        if strict:
            await self._install_holds(strict)
        else:
            await self._install_flow_holds()
        self._step("holds")
        for dn in self.nics:
            if len(dn.fds) > 1:
                await self._pin_queue(dn, pid)
        loop = asyncio.get_running_loop()
        for dn in self.nics:
            if dn.hold is None:
                # No hold mirrors the live frames: read them to know which the
                # network delivered here itself.
                shadow = Shadow(dn.nic.tap, keep=100_000)  # emptied on every pull
                self._on_exit(f"closing {dn.nic.tap}'s shadow", self._close_shadow, shadow)
                dn.shadow = shadow
                loop.add_reader(shadow.fileno(), self.replay.pull_direct, dn)
        self._step("shadow")
        self.sm.to(State.ARMED)
        return {"nics": [{"mac": d.nic.mac, "tap": d.nic.tap, "ring": d.orig_qlen} for d in self.nics],
                "strict": self.strict}

    # -- one queue while frames are forwarded -----------------------------------------
    async def _pin_queue(self, dn: DestNic, qemu_pid: int) -> None:
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
        assert self.mon is not None
        rss = await rss_in_use(self.mon, dn.nic.mac)
        if rss or rss is None or dn.hold is None:
            if rss:
                why = "QEMU steers them with RSS"
            elif rss is None:
                why = "QEMU cannot say whether it steers them (RSS)"
            else:
                why = "no hold to guard the change"
            self.hold_notes.append(f"{dn.nic.tap}: {len(dn.fds)} queues and {why}: forwarded "
                                   "frames may be read out of order across queues")
            return
        try:
            await asyncio.to_thread(dn.hold.pin_queue, dn.fds[0], qemu_pid, dn.nic.qemu_fds[0])
        except KernelError as exc:
            self.hold_notes.append(f"{dn.nic.tap}: cannot keep its queues to one ({exc}): forwarded "
                                   "frames may be read out of order across queues")
            return
        dn.pinned_t = time.monotonic()
        self._on_exit(f"giving {dn.nic.tap} its automatic queue choice back", self._unpin_queue, dn)

    def _unpin_queue(self, dn: DestNic) -> None:
        if dn.pinned_t is None or dn.hold is None:
            return
        dn.hold.unpin_queue(dn.fds[0])
        dn.pinned_ms = round((time.monotonic() - dn.pinned_t) * 1000, 1)
        dn.pinned_t = None

    async def _unpin_queues(self, deadline: float, settle_s: float = 0.0) -> None:
        """Every forwarded frame is in: the tap chooses queues by itself
        again, once QEMU has read what queue 0 holds.  A frame sent to
        another queue after that can still be read by the VM first, if it
        is slow to handle queue 0: with strict ordering the live frames are
        still held here, and wait ``settle_s`` more.  Without it they are
        not, and that one moment may reorder a frame (seen once in the lab
        with 4 queues: 1 reply)."""
        unpinned = False
        for dn in self.nics:
            if dn.pinned_t is None:
                continue
            while self.running and not dn.ring_empty() and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            self._unpin_queue(dn)
            unpinned = True
        if unpinned and settle_s:
            await asyncio.sleep(min(settle_s, max(0.0, deadline - time.monotonic())))

    async def _check_vm(self, vm: dict[str, str]) -> None:
        """The session is tied to one VM: the destination QEMU must be the
        source VM's incoming twin (the same UUID, and name when it has one)."""
        assert self.mon is not None
        if "uuid" in vm:
            uuid_here = str((await self.mon.execute("query-uuid")).get("UUID", "")).lower()
            if uuid_here != vm["uuid"]:
                raise SessionError("vm", f"the QEMU at the destination socket is VM {uuid_here}, not "
                                   f"{vm['uuid']}: refusing to replay another VM's frames into it")
        if vm.get("name"):
            name_here = str((await self.mon.execute("query-name")).get("name", ""))
            if name_here and name_here != vm["name"]:
                raise SessionError("vm", f"the QEMU at the destination socket is named {name_here!r}, "
                                   f"not {vm['name']!r}")

    # -- strict ordering ----------------------------------------------------------------
    async def _install_holds(self, strict: Any) -> None:
        try:
            timeout_ms = int(strict.get("hold_timeout_ms", 0)) if isinstance(strict, dict) else 0
        except (TypeError, ValueError):
            timeout_ms = 0
        if not 0 < timeout_ms <= MAX_HOLD_TIMEOUT_MS:
            raise SessionError("bad_request", f"hold_timeout_ms must be 1..{MAX_HOLD_TIMEOUT_MS}")
        self.strict, self.hold_timeout_ms = True, timeout_ms
        for dn in self.nics:
            try:
                dn.hold = await asyncio.to_thread(holdmod.Hold.install, self.sid, dn.nic.tap,
                                                  self.cfg.holds_dir, HOLD_LIMIT_BYTES, timeout_ms)
            except NetpassError as exc:
                raise SessionError("strict", f"strict ordering is not possible on {dn.nic.tap}: {exc}") from exc
            await off_loop(dn.hold.start_guard)
            if dn.hold.mirror_fd is not None:
                asyncio.get_running_loop().add_reader(dn.hold.mirror_fd, self.replay.pull_mirror, dn)

    async def _install_flow_holds(self) -> None:
        """Flow control without strict ordering: the live frames toward the
        VM wait in the kernel, not in the tap's ring, until the VM reads
        them (a VM slow to read after its resume would have them dropped by
        a full ring).  Not possible on this host: the session goes on
        without it, and says so."""
        self.hold_timeout_ms = FLOW_HOLD_TIMEOUT_MS
        for dn in self.nics:
            try:
                # (The timeout given is the plug's, before the VM runs; the
                # paced release after it is bounded by FLOW_HOLD_TIMEOUT_MS.)
                dn.hold = await asyncio.to_thread(holdmod.Hold.install, self.sid, dn.nic.tap,
                                                  self.cfg.holds_dir, HOLD_LIMIT_BYTES, 1000, False)
            except NetpassError as exc:
                self.hold_notes.append(f"no flow control on {dn.nic.tap}: {exc}")
                log.warning("session=%s no flow control on %s: %s", self.sid, dn.nic.tap, exc)
                continue
            await off_loop(dn.hold.start_guard)
            if dn.hold.mirror_fd is not None:
                asyncio.get_running_loop().add_reader(dn.hold.mirror_fd, self.replay.pull_mirror, dn)
        # Closed at once: until the VM runs nothing reads the tap anyway, and
        # the source's park may come a few milliseconds before the resume.
        await self.close_holds()

    async def close_holds(self) -> None:
        """The source parked: from now on the destination holds live RX (and guest TX, strict)."""
        if not self.holding() or self.hold_closed:
            return
        self.hold_closed = True
        for dn in self.nics:
            if dn.hold is not None:
                await asyncio.to_thread(dn.hold.close)
        assert self.mon is not None
        if await self.mon.status() == "running":
            for dn in self.nics:
                if dn.hold is not None:
                    dn.hold.stats.late = True
            self.hold_notes.append("the destination VM was already running when the hold closed: "
                                   "frames before that were not held")
        log.info("session=%s hold closed on %s", self.sid, ", ".join(d.nic.tap for d in self.nics))

    async def _release_tx_when_ready(self) -> None:
        async with self.hold_lock:
            await self._release_tx_when_ready_locked()

    async def _release_rx(self, deadline: float) -> None:
        async with self.hold_lock:
            await self._release_rx_locked(deadline)

    async def _remove_holds(self) -> None:
        async with self.hold_lock:
            await self._remove_holds_locked()

    def _flow_bound(self) -> float:
        """Until when live frames may go in at the VM's pace after its resume."""
        if self.resume_t is None:
            return float("inf")
        return self.resume_t + FLOW_HOLD_TIMEOUT_MS / 1000

    def _hold_expired(self) -> bool:
        now = time.monotonic()
        if self.resume_t is not None and now > self.resume_t + self.hold_timeout_ms / 1000:
            return True
        # The plug itself is tight only for so long after it closed (a paced
        # release is no plug: this holds until the release starts).
        return any(dn.hold is not None and dn.hold.stats.closed_t is not None and
                   dn.hold.stats.rx_release_started_t is None and
                   now > dn.hold.stats.closed_t + dn.hold.tight_s for dn in self.nics)

    async def _release_tx_when_ready_locked(self) -> None:
        """Guest TX is held until everything forwarded so far is inside the VM."""
        if not self.hold_closed or not self.running:
            return
        holds = [dn.hold for dn in self.nics if dn.hold is not None and dn.hold.stats.tx_released_t is None]
        if not holds:
            return
        if not self._hold_expired():
            if not self.replay.replay_read():
                return
        for h in holds:
            await asyncio.to_thread(h.release_tx)
        log.info("session=%s guest TX released", self.sid)

    def _release_rate(self, dn: DestNic) -> float:
        """Frames per second to release held live frames at: what the VM was
        seen to take during the replay, and above what is arriving now (more
        in one burst made the lab guest fail to answer some: seen at 4x)."""
        rate = float(MIN_RELEASE_FPS)
        if self.resume_t is not None and self.last_consumed_t is not None and dn.replayed:
            took = self.last_consumed_t - self.resume_t
            if took > 0.005:
                rate = max(rate, dn.replayed / took)
        now = time.monotonic()
        recent = [t for t in dn.held_times if t > now - 0.2]
        return max(rate, 1.5 * len(recent) / 0.2)

    async def _release_rx_locked(self, deadline: float) -> None:
        """Live RX goes in after the last forwarded frame, paced in the kernel
        at what the VM takes (see next_release_pace); past flow control's
        bound or ``deadline``, all at once (and the report says so)."""
        for dn in self.nics:
            h = dn.hold
            if h is None or h.removed or h.stats.rx_released_t is not None:
                continue
            if h.stats.tx_released_t is None:
                await asyncio.to_thread(h.release_tx)
            pacing = await self._start_pacing(dn, h, keep=False)
            log.info("session=%s releasing %d held frame(s) toward the VM at %.0f/s",
                     self.sid, h.stats.held_rx, pacing.rate)
            # Once the release runs, the frames it holds are newer than every
            # forwarded one: order is kept whatever their pace, and the strict
            # hold timeout (which bounds the wait for forwarded frames) no
            # longer applies.  Dumping them at that timeout overflowed the
            # ring of a VM that took a flood at nearly its pace (lab, 10,000
            # frames/s: 236-310 probes lost in 7 of 9 runs, where pacing
            # on lost none).  The bound is flow control's.
            bound = min(deadline, self._flow_bound())
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
                    self.hold_timed_out = True
                    why = ("it no longer gained on them" if now < bound else "the bound was reached")
                    self.hold_notes.append(f"the VM had not taken the held frames {now - started:.1f} s "
                                           f"into their release ({why}): released the rest at once")
                    await asyncio.to_thread(h.release_rx_now)
                    break
                await asyncio.sleep(max(0.001, pacing.t + RELEASE_STEP_S - time.monotonic()))
                await self._pace_step(dn, h, pacing)

    async def _release_in_order(self, deadline: float) -> None:
        """Strict ordering, once no forwarded frame is still due: the live
        frames go in after the VM has read every forwarded one."""
        while self.running and not self.replay.replay_read() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        await self._unpin_queues(deadline, UNPIN_SETTLE_S)
        await self._release_rx(deadline)

    def settled(self) -> None:
        """The source expects no more frames to forward (strict ordering;
        it still lingers, and a straggler is replayed behind live frames and
        counted as reordered): the held live frames may go in as soon as the
        forwarded ones are read, bounded like flow control."""
        if self.strict and self.running and self.strict_release is None:
            self.strict_release = self._task(self._release_in_order(self._flow_bound()), "settled release")

    async def _flow_control(self) -> None:
        """Without strict ordering: the live frames held since the park go in
        at the pace the VM reads (next_release_pace), and so do the ones
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
        while not self.finishing and not self._hold_expired() and not self.replay.replay_read():
            await asyncio.sleep(RELEASE_STEP_S / 4)
        if self.finishing:
            return
        async with self.hold_lock:
            holds = [(dn, dn.hold) for dn in self.nics if dn.hold is not None and not dn.hold.removed]
            for dn, h in holds:
                pacing = await self._start_pacing(dn, h, keep=True)
                log.info("session=%s flow control: %d live frame(s) held, going in from %.0f/s",
                         self.sid, h.stats.held_rx, pacing.rate)
            while not self.finishing:
                if self._hold_expired():
                    self.hold_timed_out = True
                    self.hold_notes.append(f"hold bound of {self.hold_timeout_ms} ms after the resume reached "
                                           "while the VM read the held frames: the rest went in at once")
                    for _dn, h in holds:
                        await asyncio.to_thread(h.release_rx_now)
                    return
                await asyncio.sleep(RELEASE_STEP_S)
                for dn, h in holds:
                    assert dn.pacing is not None
                    await self._pace_step(dn, h, dn.pacing)

    async def _start_pacing(self, dn: DestNic, h: holdmod.Hold, keep: bool) -> Pacing:
        """Start the paced release of ``dn``'s held live frames (a release
        that flow control started goes on at its pace).  No more in the
        first step than a quarter ring: the rate the replay was read at may
        be a first burst the VM does not keep up."""
        if dn.pacing is None:
            rate = min(self._release_rate(dn), (dn.orig_qlen or 500) // 4 / RELEASE_STEP_S)
            await asyncio.to_thread(h.release_rx, rate, keep)
            dn.pacing = Pacing(rate, time.monotonic(), dn.read_tx())
        return dn.pacing

    async def _pace_step(self, dn: DestNic, h: holdmod.Hold, p: Pacing) -> None:
        """One step of a paced release: the VM's reading since the last, the
        ring's level, the pace for the next (next_release_pace)."""
        ring = dn.orig_qlen or 500
        now, tx = time.monotonic(), dn.read_tx()
        level = self.replay.ring_level(dn)
        p.estimate = vm_reading((tx - p.tx) / max(1e-3, now - p.t), p.estimate, level, ring)
        pace = next_release_pace(p.estimate, level, ring, p.rate)
        p.t, p.tx = now, tx
        if repace_needed(p.rate, pace, ring):
            p.rate = pace
            await asyncio.to_thread(h.repace, pace)
            log.debug("session=%s release pace %.0f/s", self.sid, pace)

    async def _remove_holds_locked(self) -> None:
        for dn in self.nics:
            h = dn.hold
            if h is None or h.removed:
                continue
            if h.mirror_fd is not None:
                try:
                    asyncio.get_running_loop().remove_reader(h.mirror_fd)
                except (RuntimeError, ValueError):
                    pass
            try:
                await asyncio.to_thread(h.remove, self.running)
            except NetpassError as exc:
                self.hold_notes.append(str(exc))
                log.error("session=%s %s", self.sid, exc)
            h.stop_guard()  # the hold object stays: its counts go in the report

    # -- replay -------------------------------------------------------------------------
    async def _feeder(self) -> None:
        while True:
            self._check_vm_alive()
            await self.replay.tell_fed()
            if not self.running:
                await self._see_resume()
            if self.strict:
                if self.hold_closed and self._hold_expired() and not self.hold_timed_out:
                    self.hold_timed_out = True
                    past_resume = (self.resume_t is not None and
                                   time.monotonic() > self.resume_t + self.hold_timeout_ms / 1000)
                    why = (f"hold timeout of {self.hold_timeout_ms} ms reached" if past_resume else
                           "the kernel hold is tight only for a few seconds and the VM has not resumed")
                    self.hold_notes.append(f"{why}: released everything; later forwarded frames "
                                           "may be overtaken")
                    log.warning("session=%s hold timeout: releasing", self.sid)
                    await self._release_rx(time.monotonic() + 5)
                await self._release_tx_when_ready()
            elif self.running and self.hold_closed and self.flow_release is None:
                # Flow control: live frames go in at the pace the VM reads, from now on.
                self.flow_release = self._task(self._flow_control(), "paced release")
            if any(dn.pending for dn in self.nics):
                self.replay.feed()
                # A paused VM reads nothing (accept() and migrated() feed
                # too): polling it only takes CPU from the incoming migration.
                await asyncio.sleep(0.0005 if self.running else 0.002)
            elif self.unconsumed and self.running:
                if all(self.replay.consumed(dn) for dn in self.nics):
                    self.last_consumed_t = time.monotonic()
                    self.unconsumed = False
                await asyncio.sleep(0.0005)
            else:
                await asyncio.sleep(0.002)

    async def _see_resume(self) -> None:
        """The VM here resumed (its own RESUME event): it runs whether or not
        the source's 'migrated' got here (a link cut at the switchover).  The
        frames held for it go in from now on, at its pace; waiting for the
        source, they would wait in the hold until the source is declared
        lost (5 s)."""
        if self.mon is None:
            return
        try:
            while (ev := await self.mon.next_event(0)) is not None:
                if ev.name == "RESUME" and self.resume_t is None:
                    self.resume_t = ev.emitted
                    self.running = True
                    log.info("session=%s the VM resumed here", self.sid)
        except QMPError as exc:
            log.debug("session=%s events: %s", self.sid, exc)

    async def migrated(self, req: dict[str, Any]) -> dict[str, Any]:
        """The source completed: wait for the destination VM to run.

        QEMU starts it by itself, or a management layer that started it with
        ``-S`` continues it; netpass never resumes a VM on its own.
        """
        assert self.mon is not None
        await self._see_resume()  # events queued since arming
        wait_s = req.get("wait_running_s", 30)
        if not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= 120:
            raise SessionError("bad_request", "wait_running_s must be 0 to 120 seconds")
        deadline = time.monotonic() + wait_s
        status = await self.mon.status()
        next_poll = time.monotonic() + 0.05
        while status != "running" and time.monotonic() < deadline:
            self._check_vm_alive()
            ev = await self.mon.next_event(0.002)
            self.replay.feed()
            if ev is not None and ev.name == "RESUME":
                self.resume_t = ev.emitted
                status = "running"
                break
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.05
                status = await self.mon.status()
        if status == "running" and self.resume_t is None:
            self.resume_t = time.monotonic()
        self.replay.feed()
        self.running = status == "running"
        return {"status": status}

    async def finish(self, timeout: float) -> dict[str, Any]:
        """Wait until every queued frame is inside the VM, then report."""
        deadline = time.monotonic() + timeout
        if not self.strict:
            for dn in self.nics:  # the source is done: no frame of it can be a duplicate any more
                if dn.hold is not None and not dn.hold.removed:
                    await asyncio.to_thread(dn.hold.stop_mirror)
        while time.monotonic() < deadline:
            self._check_vm_alive()
            self.replay.feed()
            # (the ring itself may never be empty: live frames keep coming)
            if not any(dn.pending for dn in self.nics) and \
                    (not self.running or all(self.replay.consumed(dn) for dn in self.nics)):
                break
            await asyncio.sleep(0.001)
        if self.unconsumed or self.last_consumed_t is None:
            self.last_consumed_t = time.monotonic()
        for dn in self.nics:
            if dn.pending:
                dn.drop("not_consumed_in_time", len(dn.pending))
                dn.pending.clear()
        if self.strict:
            if self.strict_release is not None:  # the source settled earlier: it runs
                await self.strict_release
            # Now, with the source done, every forwarded frame is in.
            await self._release_in_order(deadline)
            await self._remove_holds()
        elif self.holding():
            self.finishing = True
            if self.flow_release is not None:
                try:
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(self.flow_release)
                except TimeoutError:
                    pass
            # What the hold still has goes in at the VM's pace while the VM
            # gains on it, then it goes.
            await self._release_rx(deadline)
            await self._unpin_queues(deadline)
            await self._remove_holds()
        return self.report()

    def report(self) -> dict[str, Any]:
        return destreport.build(self, (time.process_time() - self.cpu0) * 1000)

    def abort(self, reason: str = "aborted") -> dict[str, Any]:
        for dn in self.nics:
            if dn.pending:
                dn.drop(reason, len(dn.pending))
                dn.pending.clear()
        return self.report()

    # -- lifecycle ----------------------------------------------------------------------
    @staticmethod
    def _close_counter(dn: DestNic) -> None:
        if dn.tx_counter is not None:
            dn.tx_counter.close()
            dn.tx_counter = None

    @staticmethod
    def _close_shadow(shadow: Shadow) -> None:
        try:
            asyncio.get_running_loop().remove_reader(shadow.fileno())
        except (RuntimeError, ValueError):
            pass
        shadow.close()

    @staticmethod
    async def _stop_task(task: asyncio.Task[Any]) -> None:
        if not task.done():
            task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a dead task's error was handled
            pass

    def _task(self, coro: Awaitable[None], what: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._on_exit(f"stopping the {what}", self._stop_task, task)
        return task

    async def cleanup(self) -> None:
        """Undo everything, newest first; never raises (errors are logged
        and noted in ``cleanup_errors``)."""
        await self.undo.aclose()
        self.nics.clear()

    async def _next(self) -> tuple[int, bytes | memoryview]:
        """The source's next message; or the feeder's failure, if it dies first."""
        if self.feeder is None or self.ch.reader.ready():
            return await self.ch.recv(timeout=600)
        recv = asyncio.ensure_future(self.ch.recv(timeout=600))
        await asyncio.wait({recv, self.feeder}, return_when=asyncio.FIRST_COMPLETED)
        if recv.done():
            return recv.result()
        recv.cancel()
        try:
            await recv
        except (asyncio.CancelledError, ChannelError):
            pass
        exc = None if self.feeder.cancelled() else self.feeder.exception()
        if isinstance(exc, SessionError):
            raise exc
        raise SessionError("replay", f"the replay into the destination VM failed: {exc}")

    async def _on_source_lost(self, exc: ChannelError) -> None:
        """The source went silent or away mid-session.  Frames the agent
        holds are the only copy once the migration completed: if the VM
        runs here (now, or within SOURCE_LOST_WAIT_S), they go in, and the
        session ends as if the source had said 'end'; if not, they are
        dropped (the source gives its own copies back to its VM)."""
        self.source_lost = str(exc)
        if self.running:
            status = "running"
        else:
            try:
                status = (await self.migrated({"wait_running_s": SOURCE_LOST_WAIT_S}))["status"]
            except (QMPError, NetpassError) as qexc:
                status = f"unknown ({qexc})"
        if status != "running":
            log.error("session=%s the source is lost (%s) and the VM here is %s: dropping what the "
                      "session holds", self.sid, exc, status)
            self.abort()
            self.sm.fail(f"source lost: {exc}")
            return
        log.warning("session=%s the source is lost (%s); the VM runs here: delivering what the "
                    "session holds", self.sid, exc)
        if self.sm.state is not State.REPLAYING:
            self._to_replaying()
        await self.finish(10)
        self.sm.to(State.DONE)

    def _to_replaying(self) -> None:
        if self.sm.state is State.ARMED:
            self.sm.to(State.CAPTURING)
            self.sm.to(State.SHIPPING)
        self.sm.to(State.REPLAYING)

    async def run(self, first: dict[str, Any]) -> None:
        ch = self.ch
        try:
            armed = await self.arm(first)
            await ch.send_json(CONTROL, {"op": "armed", "session": self.sid, **armed})
            self.feeder = self._task(self._feeder(), "feeder")
            while True:
                try:
                    mtype, payload = await self._next()
                except ChannelError as exc:
                    if isinstance(exc, AuthError):
                        raise
                    await self._on_source_lost(exc)
                    return
                if mtype == BATCH:
                    if self.resume_t is not None and \
                            time.monotonic() > self.resume_t + LATE_BATCH_BOUND_S:
                        raise SessionError("late", f"a batch {LATE_BATCH_BOUND_S:.0f} s after the VM "
                                           "resumed: the session is over")
                    if self.sm.state is State.ARMED:
                        self.sm.to(State.CAPTURING)
                        self.sm.to(State.SHIPPING)
                    try:
                        ack = self.replay.accept(payload)
                    except wire.WireError as exc:
                        raise SessionError("bad_batch", f"batch {self.next_seq} rejected: {exc}") from exc
                    await ch.send_json(CONTROL, {"op": "ack", **ack, "fed": self.fed()})
                    continue
                msg = _control(payload, mtype)
                op = msg.get("op")
                if op == "prepare":
                    # The park is near: hold from now on (see the source's _prepare_destination).
                    await self.close_holds()
                elif op == "settled":
                    self.settled()
                elif op == "stopped":
                    if self.sm.state is State.ARMED:
                        self.sm.to(State.CAPTURING)
                        self.sm.to(State.SHIPPING)
                    await self.close_holds()
                    self.replay.mark_stop()
                elif op == "migrated":
                    if self.sm.state is State.ARMED:
                        self.sm.to(State.CAPTURING)
                        self.sm.to(State.SHIPPING)
                    res = await self.migrated(msg)
                    self.sm.to(State.REPLAYING)
                    await ch.send_json(CONTROL, {"op": "resumed", **res})
                elif op == "end":
                    timeout = msg.get("timeout", 10)
                    if not isinstance(timeout, (int, float)) or not 0 <= timeout <= 60:
                        raise SessionError("bad_request", "end.timeout must be 0 to 60 seconds")
                    rep = await self.finish(float(timeout))
                    self.sm.to(State.DONE)
                    rep["state"] = "done"
                    await ch.send_json(CONTROL, {"op": "report", **rep})
                    return
                elif op == "abort":
                    rep = self.abort()
                    self.sm.fail(str(msg.get("reason", "aborted by the source")))
                    rep["state"] = "failed"
                    await ch.send_json(CONTROL, {"op": "report", **rep})
                    return
                else:
                    raise SessionError("bad_request", f"unknown operation {op!r}")
        except SessionError as exc:
            log.error("session=%s refused: %s", self.sid, exc)
            self.sm.fail(str(exc))
            try:
                await ch.send_json(ERROR, {"code": exc.code, "message": str(exc), "report": self.abort(
                    "destination_vm_exited" if exc.code == "dest_vm_gone" else "aborted")})
            except ChannelError:
                pass
        except (ChannelError, QMPError, NetpassError, OSError, ValueError, TypeError) as exc:
            log.error("session=%s failed: %s", self.sid, exc)
            self.sm.fail(str(exc))
            try:
                await ch.send_json(ERROR, {"code": "agent", "message": str(exc)})
            except ChannelError:
                pass
        finally:
            self.final_report = self.report()  # before cleanup forgets the NICs
            await self.cleanup()


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """The agent's TLS context; an unreadable or mismatched certificate and
    key is a UsageError that says which."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError is an OSError
        if isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc):
            why = f"the key {key} does not belong to the certificate {cert}"
        elif isinstance(exc, ssl.SSLError):
            why = f"{cert} or {key} is not a PEM certificate and key ({exc.reason or exc})"
        else:
            why = f"cannot read {exc.filename or cert}: {exc.strerror or exc}"
        raise UsageError(f"TLS: {why}; check --tls-cert and --tls-key") from exc
    return ctx


def check_qmp_socket(path: str, qmp_root: Path, uids: frozenset[int]) -> str:
    """The real path of a QMP socket the agent may open, or a SessionError
    saying why not: it must lie under ``qmp_root``, with no world-writable
    directory from / down to it (anyone could plant a socket there), be a
    socket, and be owned by root or a QEMU user (``uids``)."""
    real = os.path.realpath(path)
    root = os.path.realpath(qmp_root)
    if os.path.commonpath([real, root]) != root:
        raise SessionError("qmp_root", f"QMP socket {path} is outside this agent's --qmp-root {root}")
    try:
        st = os.stat(real)
    except OSError:
        raise SessionError("qmp", f"no QMP socket at {path} on the destination") from None
    for d in Path(real).parents:
        if os.stat(d).st_mode & stat.S_IWOTH:
            raise SessionError("qmp_path", f"{d} is world-writable: anyone could put a socket there; "
                               "give QEMU a QMP socket in a directory only root (or QEMU's user) "
                               "can write")
    if not stat.S_ISSOCK(st.st_mode):
        raise SessionError("qmp", f"{path} is not a socket")
    if st.st_uid not in uids:
        raise SessionError("qmp_owner", f"{path} belongs to uid {st.st_uid}, neither root nor a QEMU user "
                           f"(uids {sorted(uids)}; see the agent's --qemu-user)")
    return real


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_open(req: dict[str, Any]) -> tuple[str, list[str], dict[str, str]]:
    """An 'open' request's fields, checked: (dest_qmp, macs, vm).  Anything
    malformed is refused with a SessionError that says which field."""
    dest_qmp = req.get("dest_qmp")
    if not isinstance(dest_qmp, str) or not dest_qmp or "\0" in dest_qmp or len(dest_qmp) > 4096:
        raise SessionError("bad_request", "dest_qmp must be a path (a non-empty string without NUL)")
    macs = req.get("macs")
    if not isinstance(macs, list) or not 1 <= len(macs) <= 64 or \
            not all(isinstance(m, str) and _MAC.fullmatch(m.lower()) for m in macs):
        raise SessionError("bad_request", "macs must be a list of 1 to 64 MAC addresses")
    vm = req.get("vm", {})
    if not isinstance(vm, dict) or not all(isinstance(v, str) for v in vm.values()):
        raise SessionError("bad_request", "vm must be an object of strings")
    out: dict[str, str] = {}
    if vm.get("uuid"):
        if not _UUID.fullmatch(vm["uuid"].lower()):
            raise SessionError("bad_request", "vm.uuid must be a UUID")
        out["uuid"] = vm["uuid"].lower()
    if vm.get("name"):
        if len(vm["name"]) > 256 or "\0" in vm["name"]:
            raise SessionError("bad_request", "vm.name must be a short string")
        out["name"] = vm["name"]
    for key in ("resume",):
        if key in req and not isinstance(req[key], bool):
            raise SessionError("bad_request", f"{key} must be true or false")
    if "strict" in req and not isinstance(req["strict"], (dict, bool)):
        raise SessionError("bad_request", "strict must be an object")
    return dest_qmp, [m.lower() for m in macs], out


def _control(payload: bytes | memoryview, mtype: int) -> dict[str, Any]:
    import json

    if mtype != CONTROL:
        raise SessionError("bad_request", f"unexpected message type {mtype}")
    try:
        msg = json.loads(bytes(payload))
    except (ValueError, RecursionError) as exc:
        raise SessionError("bad_request", "malformed control message") from exc
    if not isinstance(msg, dict):
        raise SessionError("bad_request", "control message is not an object")
    return msg


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.sessions: dict[str, DestSession] = {}
        self.unauthenticated = 0
        self.unauthenticated_from: dict[str, int] = {}
        self.server: asyncio.AbstractServer | None = None
        self.metrics = AgentMetrics()
        self.session_tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        heap.keep_freed()  # batches come and go hundreds of times a second (see heap.py)
        for line in await asyncio.to_thread(holdmod.recover, self.cfg.holds_dir):
            log.warning("startup: %s", line)
        if self.cfg.metrics_listen:
            self.metrics.serve(self.cfg.metrics_listen)
        host, port = parse_hostport(self.cfg.listen)
        ctx = None
        if self.cfg.tls_cert:
            ctx = tls_context(self.cfg.tls_cert, self.cfg.tls_key)
        try:
            self.server = await serve(self._handle, host, port, ctx)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.cfg.listen}: {exc.strerror}") from exc
        log.info("agent listening on %s (qmp-root %s)", self.cfg.listen, self.cfg.qmp_root)

    async def serve_forever(self) -> None:
        await self.start()
        assert self.server is not None
        try:
            async with self.server:
                await self.server.serve_forever()
        finally:  # cancelled (SIGTERM): every session ends, undone
            await self.shutdown()

    async def shutdown(self) -> None:
        """End every session: each is cancelled and undoes what it changed."""
        tasks = list(self.session_tasks)
        if tasks:
            log.warning("stopping: ending %d session(s)", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: Wire, writer: Any) -> None:
        peer = writer.get_extra_info("peername")
        addr = str(peer[0]) if peer else "?"
        ch = Channel(reader, writer, peer=f"{peer[0]}:{peer[1]}" if peer else "?")
        # Unauthenticated connections are capped, in all and per address (as
        # OpenSSH's MaxStartups): a flood of them costs a few KiB each, for
        # one handshake deadline at most, and cannot crowd a real one out
        # of another address.
        if self.unauthenticated >= MAX_UNAUTHENTICATED or \
                self.unauthenticated_from.get(addr, 0) >= MAX_UNAUTHENTICATED_PER_ADDRESS:
            log.warning("refused %s: too many connections waiting to authenticate", ch.peer)
            await ch.close()
            return
        self.unauthenticated += 1
        self.unauthenticated_from[addr] = self.unauthenticated_from.get(addr, 0) + 1
        try:
            await server_handshake(ch, self.cfg.token)
        except AuthError as exc:
            log.error("refused %s: %s", ch.peer, exc)
            await ch.close()
            return
        except Exception as exc:  # noqa: BLE001 - anything a stranger sends ends its connection
            log.error("handshake with %s failed: %s", ch.peer, exc)
            await ch.close()
            return
        finally:
            self.unauthenticated -= 1
            left = self.unauthenticated_from.pop(addr, 1) - 1
            if left:
                self.unauthenticated_from[addr] = left
        try:
            mtype, payload = await ch.recv(timeout=60)
            msg = _control(payload, mtype)
            if msg.get("op") == "ping":
                await ch.send_json(CONTROL, {"op": "pong", "sessions": len(self.sessions)})
                return
            if msg.get("op") != "open":
                raise SessionError("bad_request", "expected an 'open' request")
            sid = msg.get("session")
            if sid is None:
                sid = uuid.uuid4().hex[:12]
            if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
                raise SessionError("bad_request", "a session id is 1 to 64 lowercase hex digits")
            ch.start_beats()  # the source's silence is seen within channel.SILENCE_S
            sess = DestSession(self.cfg, ch, sid, self.metrics)
            self.sessions[sid] = sess
            self.metrics.active.inc()
            log.info("session=%s opened by %s", sid, ch.peer)
            me = asyncio.current_task()
            assert me is not None
            self.session_tasks.add(me)
            try:
                await sess.run(msg)
            finally:
                self.session_tasks.discard(me)
                self.sessions.pop(sid, None)
                if not self.sessions:
                    heap.give_back()  # an idle agent keeps no finished session's cache
                self.metrics.active.dec()
                self.metrics.session_ended(sess.final_report or sess.report())
                log.info("session=%s closed state=%s", sid, sess.sm.state.value)
        except SessionError as exc:
            log.error("refused request from %s: %s", ch.peer, exc)
            try:
                await ch.send_json(ERROR, {"code": exc.code, "message": str(exc)})
            except ChannelError:
                pass
        except ChannelError as exc:
            log.error("connection %s: %s", ch.peer, exc)
        finally:
            await ch.close()
