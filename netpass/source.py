"""``netpass migrate``: the source side of a zero-loss migration.

1. **Arm.** Authenticate to the destination agent, find the VM's NICs and
   taps, take QEMU's tap fds (``pidfd_getfd``), give each tap a parking tap
   with its steering ready but off (``park.py``), and have the agent arm the
   destination.  Any failure here aborts before the migration starts (or,
   with ``best_effort``, migrates without netpass and says so).
2. **Migrate**, with QEMU's ``downtime-limit`` at 0: QEMU then switches over
   only once no RAM is left to send, which netpass can see coming
   (``endgame.py``).  Nothing runs per frame meanwhile: netpass polls
   ``query-migrate`` (every 5 ms, every 1 ms near the end).
3. **Park, then let QEMU stop.**  Just before the window in which QEMU
   sends the last RAM, netpass parks every frame bound for the VM in its
   parking tap, sends one sacrificial frame into each of the VM tap's
   queues and lets the migration finish.  Once QEMU has read the sacrificial
   frames, nothing real is in the VM's ring or held inside QEMU, so when
   QEMU stops the VM it swallows nothing netpass does not know of: the
   account is exact (``swallowed_account: exact``).
4. **Capture and ship** the parked frames as they come, in zstd batches when
   it pays; the agent replays them into the destination VM's NIC.
5. **Linger** until a quiet period after the destination resumes, once the
   destination reports the network delivering there (bounded); our fd
   keeps the source tap alive after the source QEMU exits, and a sticky FDB
   entry keeps the source bridge sending the VM's frames to it.
6. **Undo** every change (kernel and QEMU) on every exit path, in reverse
   order, from one log (an ``AsyncExitStack``).  If the migration fails after
   the park, the parked frames go back into the source VM first.

When the VM stops without netpass having parked first (a management layer
paused it, or QEMU finished its RAM sooner than its counters let anyone
see), netpass parks at once and drains what the VM's ring still holds; the
report says so (``stop_path: unforeseen``) and how sure the count of frames
QEMU swallowed is (``swallowed_account: inferred | unknown``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from . import links, pcap, procs, srcreport, wire
from .blocking import off_loop
from .channel import CONTROL, AuthError, Channel, ChannelError, connect
from .endgame import Endgame
from .errors import KernelError, MigrationFailed, NetpassError, QMPError
from .migration import progress_line, stop_task
from .nics import discover, virtio_backend
from .packet import ShadowRing
from .qmp import QMP, Event, Monitor, peer_pid
from .session import Phase, plan_stop
from .srcback import return_parked
from .srcengage import Parking, log_failure
from .srchost import Host
from .srcqemu import QemuControl
from .srcsettle import Settlement, VmRings, remove_reader
from .srcship import Shipper
from .srcstate import MigrateOptions, SourceNic, SourceState
from .srctail import Tail, lost_after_completion
from .virt import DomainMonitor
from .watch import ACTIVE, Completed, Fact, Failed, Stopped, Watch

log = logging.getLogger(__name__)

# The source's setup steps, in order; a test makes the session fail right
# after each (SourceSession.fail_after) and checks that nothing is left.
ARM_STEPS = ("channel", "monitor", "opened", "guard", "steering", "fds", "park", "inject", "shadow",
             "readers", "qemu")

Progress = Callable[[str, dict[str, Any]], None]
# The lab's way to have every stop come unforeseen, as a management layer's
# or a last window's would: netpass never plans the park.
_ENDGAME_OFF = os.environ.get("NETPASS_ENDGAME") == "off"
# The lab's record of what the source QEMU said (events, polled statuses)
# and the phases the session reached, one JSON object a line: replayed
# through watch.py and session.py by tests/test_watch.py.
_CONTROL_TRACE = os.environ.get("NETPASS_CONTROL_TRACE")


class SourceSession(SourceState):
    """The source's I/O: the QMP monitor, the channel to the agent, the taps;
    the facts it gathers are its ``SourceState``."""


    def __init__(self, opts: MigrateOptions, progress: Progress | None = None,
                 find_dest: Callable[[], Awaitable[str]] | None = None) -> None:
        super().__init__(opts, uuid.uuid4().hex[:12])
        # Attached (follow.py): the destination's agent is asked for while
        # QEMU is being held back, not before (see attach).
        self.find_dest = find_dest
        self.fail_after: str | None = None  # a test hook (see ARM_STEPS)
        self.progress = progress or (lambda kind, data: None)
        self.undo = AsyncExitStack()
        self.ch: Channel | None = None
        self.mon: QMP | None = None
        self.qemu: QemuControl | None = None  # (once the monitor is connected)
        self.cpu0 = time.process_time()
        self.shipper: Shipper | None = None  # (once the channel is up)
        self.src_pid: int | None = None
        self.vm_rings = VmRings(self)
        self.settle_task: asyncio.Task[None] | None = None
        self.host = Host(self, self.undo, self._step)
        self.parking = Parking(self, self, self.host)
        self.tail = Tail(self, self)
        self.final_report: dict[str, Any] | None = None
        self.watch = Watch()  # what QEMU says of its migration

    @property
    def channel_error(self) -> NetpassError | None:
        """The channel's first failure (None while it works, or before it exists)."""
        return self.shipper.error if self.shipper is not None else None

    async def send_json(self, obj: dict[str, Any]) -> None:
        """A control message to the agent (none before the channel is up)."""
        if self.ch is not None:
            await self.ch.send_json(CONTROL, obj)

    async def reply(self, op: str, timeout: float) -> dict[str, Any]:
        assert self.shipper is not None
        return await self.shipper.reply(op, timeout)

    # -- helpers --------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        log.info("session=%s %s", self.sid, msg)
        self.progress("info", {"message": msg})

    # -- arm ------------------------------------------------------------------------------
    async def arm(self) -> None:
        self.phases.require(Phase.NEW)
        self.ch = await connect(self.o.dest_agent, self.o.token, self.o.tls_ca)  # auth first
        self.shipper = Shipper(self, self.ch)
        self.undo.push_async_callback(self.ch.close)
        self.ch.start_beats()  # the agent's silence is seen within channel.SILENCE_S
        self._step("channel")
        if self.mon is None:  # (attached: connected before the arm, see hold_back)
            self.src_pid = peer_pid(self.o.qmp)
            await self._connect_monitor()
        pid = self.src_pid
        assert self.mon is not None and pid is not None
        self._step("monitor")
        status = await self.mon.status()
        if status not in ("running", "paused"):
            if self.o.attached:
                raise MigrationFailed(f"the source VM is already switching over ('{status}'): the migration "
                                      "reached its end before netpass could hold it back")
            raise MigrationFailed(f"the source VM is '{status}': it must be running or paused to migrate")
        self.was_running = status == "running"
        mig = await self.mon.execute("query-migrate")
        if self.o.attached and mig.get("status") not in ACTIVE:
            raise MigrationFailed(f"the migration ended ({mig.get('status')}) before netpass armed")
        if not self.o.attached and mig.get("status") in ACTIVE:
            raise MigrationFailed("a migration of this VM is already in progress")
        found = await discover(self.mon, pid)
        vm = {"uuid": str((await self.mon.execute("query-uuid")).get("UUID", "")).lower(),
              "name": str((await self.mon.execute("query-name")).get("name", ""))}
        if vm["uuid"] == "00000000-0000-0000-0000-000000000000":
            vm.pop("uuid")  # QEMU started without -uuid: every such VM has this one
        where = {"libvirt_uuid": self.o.libvirt_uuid} if self.o.attached else {"dest_qmp": self.o.dest_qmp}
        await self.ch.send_json(CONTROL, {"op": "open", "session": self.sid, **where,
                                          "macs": [n.mac for n in found], "resume": self.was_running,
                                          "vm": {k: v for k, v in vm.items() if v},
                                          **({"strict": {"hold_timeout_ms": self.o.hold_timeout_ms}}
                                             if self.o.strict_ordering else {})})
        armed = await self.ch.recv_json(CONTROL, timeout=60)
        if armed.get("op") != "armed":
            raise ChannelError(f"agent answered {armed.get('op')!r} to 'open'")
        self._step("opened")
        # Off the loop: these steps can wait long in the kernel (see blocking.py).
        for line in await off_loop(self.host.arm, found, pid):
            self.say(line)
        for sn in self.nics:
            try:
                sn.vdev = await virtio_backend(self.mon, sn.nic.mac)
            except QMPError as exc:
                log.info("session=%s no virtio device found for %s: %s", self.sid, sn.nic.mac, exc)
        loop = asyncio.get_running_loop()
        for sn in self.nics:
            loop.add_reader(sn.park.fileno(), self._on_parked, sn)
            self.undo.callback(remove_reader, sn.park.fileno())
        self._step("readers")
        self.phases.reach(Phase.ARMED)
        self.say(f"armed: {len(self.nics)} NIC(s) " +
                  ", ".join(f"{n.nic.mac} on {n.nic.tap} ({len(n.fds)} queue(s))" for n in self.nics))

    async def _connect_monitor(self) -> None:
        if self.o.attached:
            assert self.o.libvirt_uri is not None and self.o.libvirt_uuid is not None
            self.mon = DomainMonitor(self.o.libvirt_uri, self.o.libvirt_uuid, "src")
        else:
            self.mon = Monitor(self.o.qmp, "src")
        await self.mon.connect()
        self.undo.push_async_callback(self.mon.close)
        self.qemu = QemuControl(self, self.mon, self.undo, self.say)

    async def attach(self) -> None:
        """Attached to a migration libvirt started: hold QEMU back and, at the
        same time, find the destination's agent (``find_dest``).  A guest's
        RAM phase can end within a second, so neither waits for the other.
        Should the search fail, the hold-back still finishes, so that the
        undo gives back every setting it changed."""
        hold = asyncio.ensure_future(self.hold_back())
        try:
            if self.find_dest is not None:
                self.o = dataclasses.replace(self.o, dest_agent=await self.find_dest())
        except BaseException:
            await asyncio.wait([hold])
            if not hold.cancelled() and hold.exception() is not None:
                log.info("session=%s the hold-back failed as well: %s", self.sid, hold.exception())
            raise
        await hold

    async def hold_back(self) -> None:
        """Attached to a migration already under way: first of all, QEMU is
        kept from switching over before netpass is armed (``downtime-limit``
        0, and a trickle of bandwidth until the arm is done; see srcqemu)."""
        assert self.o.libvirt_uuid is not None
        pid = await asyncio.to_thread(procs.qemu_by_uuid, self.o.libvirt_uuid)
        if pid is None:
            raise MigrationFailed(f"no QEMU process runs the domain {self.o.libvirt_uuid} on this host")
        self.src_pid = pid
        await self._connect_monitor()
        assert self.qemu is not None
        for line in await off_loop(self.host.start_guard):
            self.say(line)
        await self.qemu.hold_back(self.host)

    def _step(self, name: str) -> None:
        """Mark the named setup step done (its time goes in the report), and
        the test hook: fail right after it (ARM_STEPS)."""
        self.arm_steps[name] = self.ms(time.monotonic()) or 0.0
        if self.fail_after == name:
            raise KernelError(f"failure injected after the arm step '{name}'")

    # -- capture --------------------------------------------------------------------------
    def _on_parked(self, sn: SourceNic) -> None:
        self.take(sn, sn.park.read(256), wire.VNET_HDR_LEN, time.monotonic())

    def capture_now(self) -> None:
        """Read whatever the parking taps (and, after an unforeseen stop, the
        VM's rings) hold right now."""
        for sn in self.nics:
            while True:
                bufs = sn.park.read(256)
                if not bufs:
                    break
                self.take(sn, bufs, wire.VNET_HDR_LEN, time.monotonic())
            if self.vm_rings_drained and not self.settling:
                for fd in sn.fds:
                    self.vm_rings.read(sn, fd)

    # -- ship -----------------------------------------------------------------------------
    async def ship_pending(self) -> None:
        if self.shipper is not None:
            await self.shipper.ship_pending()

    async def _keep_shadows(self) -> None:
        """Until the stop: the shadow rings keep only their recent blocks."""
        while self.stop_t is None:
            await asyncio.sleep(ShadowRing.keep_all([r for sn in self.nics for r in sn.shadows]))

    # -- QEMU's settings --------------------------------------------------------------------
    # -- the migration --------------------------------------------------------------------
    async def _migrate(self) -> None:
        assert self.mon is not None
        self.migrate_issued = True
        if not self.o.attached:
            await self.mon.execute("migrate", {"uri": self.o.uri})
        if self.netpass_active and not _ENDGAME_OFF:
            self.endgame = Endgame(int(self.qemu_params.get("max-bandwidth", 0)))
            assert self.qemu is not None
            if self.qemu.handed_off is not None:  # (held back, and throttled still: see srcqemu)
                self.endgame.handed_off(time.monotonic(), self.qemu.handed_off)
                await self.parking.prepare_destination()
        try:
            await self._watch()
        except QMPError:
            await self._monitor_lost()
            return
        if self.o.attached:
            # libvirt holds a domain's QMP commands from its completion until
            # its Confirm (2 s in the lab): its own job info has the figures.
            return
        try:
            self.migration_info = await self.mon.execute("query-migrate", timeout=2)
            self.progress("migration", progress_line(self.migration_info))
        except QMPError:
            self.say("the source QEMU went away right after completing: that is success")

    async def _watch(self) -> None:
        """Follow the migration to its end: events as they come, query-migrate
        in between, the endgame's steps when it says so.  What QEMU's events
        and answers mean is watch.py's to say; this acts on it."""
        assert self.mon is not None
        deadline = time.monotonic() + self.o.timeout_s
        next_progress = 0.0
        while True:
            if time.monotonic() > deadline:
                raise MigrationFailed(f"the migration did not finish within {self.o.timeout_s:.0f} s")
            if self.channel_error is not None and self.netpass_active:
                raise self.channel_error
            wait = self.endgame.poll_interval() if self.endgame is not None else 0.05
            ev = await self.mon.next_event(wait)
            while ev is not None:
                await self._on_event(ev)
                ev = await self.mon.next_event(0)
            if self.completed:
                return
            asked = time.monotonic()
            info = await self.mon.execute("query-migrate")
            now = time.monotonic()
            if self.endgame is not None:
                assert self.qemu is not None
                await self.parking.follow(self.endgame, info, asked, now, self.qemu)
            self._trace({"t": now, "polled": str(info.get("status"))})
            await self._act(self.watch.polled(info), info)
            if self.completed:
                return
            if now >= next_progress:
                next_progress = now + 0.5
                self.progress("migration", progress_line(info))

    async def _on_event(self, ev: Event) -> None:
        self._trace({"t": ev.received, "event": ev.name, "data": ev.data, "emitted": ev.emitted})
        await self._act(self.watch.event(ev.name, ev.data, ev.emitted))

    def _trace(self, obj: dict[str, Any]) -> None:
        if _CONTROL_TRACE:
            with open(_CONTROL_TRACE, "a") as f:
                f.write(json.dumps(obj) + "\n")

    async def _act(self, facts: list[Fact], info: dict[str, Any] | None = None) -> None:
        """What the watch newly learned, acted on in order."""
        for fact in facts:
            if isinstance(fact, Stopped):
                await self._stopped(fact)
            elif isinstance(fact, Completed):
                self._completed()
            elif isinstance(fact, Failed):
                if info is None and self.mon is not None:
                    info = await self.mon.execute("query-migrate")
                raise MigrationFailed(f"migration {fact.status}: "
                                      f"{(info or {}).get('error-desc', 'no reason given')}")

    def _completed(self) -> None:
        if not self.completed:
            self.completed = True
            self.phases.reach(Phase.COMPLETED)

    async def _stopped(self, fact: Stopped) -> None:
        """QEMU stopped the VM (or must have: a later state says so)."""
        if not fact.first:  # the STOP event, after a status that implied it: its own time
            if fact.emitted is not None and self.stop_t is not None:
                self.stop_t = min(self.stop_t, fact.emitted)
            return
        self.stop_t = fact.emitted if fact.emitted is not None else time.monotonic()
        if self.live_end_cpu is None:
            self.live_end_cpu = time.process_time()
        if not self.netpass_active:
            return
        plan = plan_stop(self.parked_t is not None, self.verified_before_stop())
        self.settling = plan.settle
        if self.settling:
            for sn in self.nics:  # (first: QEMU may read its one frame any moment)
                try:
                    sn.tx_at_stop, sn.reads_at_stop = links.tx_packets(sn.nic.tap), sn.vm_ring_drained
                except NetpassError:
                    sn.tx_at_stop = None
        if plan.park_now:
            self.unforeseen = True
            await self.parking.park_all()
            self.vm_rings.start(self.undo)
            self.say(f"the VM stopped before netpass parked its frames ({fact.why}): parked now; "
                      "draining what its ring holds")
            asyncio.get_running_loop().create_task(self.host.pin_all()).add_done_callback(log_failure)
        elif plan.settle:
            # Parked, but QEMU had not read every sacrificial frame: what is
            # still in its rings after the one frame a queue's reader takes
            # at the stop is netpass's to carry.
            self.vm_rings.start(self.undo)
        if self.settling:
            loop = asyncio.get_running_loop()
            # Asked now, answered as soon as QEMU's main loop runs again: the
            # source may be killed right after it completes.
            settlement = Settlement(self, self.mon, self.vm_rings)
            starved = loop.create_task(settlement.ask_starved())
            self.undo.push_async_callback(stop_task, starved)
            self.settle_task = loop.create_task(settlement.run(starved))
            self.undo.push_async_callback(stop_task, self.settle_task)
        self.phases.reach(Phase.STOPPED, fact.why)

    async def _monitor_lost(self) -> None:
        """The QMP connection closed mid-migration: a management layer may
        kill the source QEMU the moment it completes, as libvirt does."""
        assert self.mon is not None
        while (ev := await self.mon.next_event(0)) is not None:
            await self._on_event(ev)
        if self.completed:
            self.say("the source QEMU went away right after completing: that is success")
            return
        gone = self.src_pid is not None and not await asyncio.to_thread(procs.alive, self.src_pid, 1.0)
        if gone and self.parked_t is not None:
            # Killed at completion before its event reached us (a reset
            # connection drops what was unread): the destination decides.
            self.notes.append("the source QEMU exited before netpass read how the migration ended; "
                              "the destination's state decides")
            self.say("the source QEMU exited: asking the destination")
            await self._act(self.watch.exited_after_park())
            return
        raise MigrationFailed("lost the source QEMU's monitor before the migration ended"
                              + ("; QEMU exited" if gone else ""))

    # -- failure --------------------------------------------------------------------------
    async def _cancel_migration(self) -> None:
        """netpass failed while QEMU migrates: cancel, so the VM stays where it
        is.  Not a migration someone else drives: that goes on without netpass."""
        if self.o.attached:
            return
        if self.qemu is not None and not self.completed and await self.qemu.cancel():
            self._completed()

    async def give_back(self) -> None:
        """The migration failed after the park: the agent is told, the stop's
        account ends, and the parked frames go back to the source VM
        (``srcback.py``)."""
        self.phases.reach(Phase.GIVING_BACK, "the migration failed after the park")
        self.say("migration failed after the park: returning the parked frames to the source VM")
        if self.ch is not None and self.channel_error is None:
            try:
                await self.ch.send_json(CONTROL, {"op": "abort", "reason": "migration failed"})
            except ChannelError:
                pass
        if self.settle_task is not None:  # (the VM runs again: its readers take their frames)
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(self.settle_task)
            except (TimeoutError, NetpassError) as exc:
                log.info("session=%s the stop's account did not finish: %s", self.sid, exc)
        self.outq.clear()
        self.vm_rings.stop()
        await return_parked(self, self.capture_now)

    # -- the whole session ----------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        error: BaseException | None = None
        try:
            if self.o.attached:
                await self.attach()
            await self._arm_or_not()
            if self.netpass_active:
                assert self.shipper is not None and self.ch is not None
                for coro in (self.shipper.receive_loop(self.ch), self.shipper.ship_loop(), self._keep_shadows()):
                    self.undo.push_async_callback(stop_task, asyncio.create_task(coro))
            assert self.qemu is not None
            await self.qemu.configure(self.host, endgame=not _ENDGAME_OFF)
            if self.netpass_active:
                self._step("qemu")
            try:
                await self._migrate()
            except (NetpassError, asyncio.CancelledError, KeyboardInterrupt) as exc:
                await self._cancel_migration()
                if not self.completed:
                    if self.parked_t is not None and self.netpass_active:
                        await self.give_back()
                    if isinstance(exc, NetpassError):
                        if self.o.attached:
                            raise MigrationFailed(f"{exc}; netpass stepped aside, the migration goes "
                                                  "on without it") from exc
                        raise MigrationFailed(f"{exc}; the VM stays on the source") from exc
                    raise
                # Too late to cancel: QEMU had completed, the VM runs on the
                # destination.  Its frames still go there if they can.
                self.notes.append(f"netpass failed ({exc}) after QEMU completed the migration")
                if not isinstance(exc, NetpassError) or not self.netpass_active or \
                        self.channel_error is not None:
                    await self.tail.count_lost(exc)
                    lost_after_completion(self, exc, self.channel_error)
            if self.netpass_active:
                try:
                    await self.tail.switch_over(self.settle_task)
                except ChannelError as exc:
                    await self.tail.count_lost(exc)
                    lost_after_completion(self, exc, self.channel_error)
        except BaseException as exc:
            error = exc
            await self._abort_unstarted(exc)
            if self.phases.phase not in (Phase.DONE, Phase.FAILED):
                self.phases.reach(Phase.FAILED, str(exc) or type(exc).__name__)
            raise
        finally:
            self.host.read_overflow()  # while the taps are still there
            try:
                await self.undo.aclose()  # every change, in reverse order
            except Exception as exc:  # noqa: BLE001 - the rest of the undo ran; say what did not
                self.notes.append(f"cleanup incomplete: {exc}")
                log.error("session=%s cleanup incomplete: %s", self.sid, exc)
            self._write_pcap()
            self._trace({"phases": self.phases.history})
            self.final_report = self.report(error)
        return self.final_report

    async def _abort_unstarted(self, exc: BaseException) -> None:
        """Failed before QEMU was asked to migrate: the agent ends its session
        at once (otherwise it waits to see whether its VM runs after all)."""
        if self.migrate_issued or self.ch is None or self.channel_error is not None:
            return
        try:
            async with asyncio.timeout(2):
                await self.ch.send_json(CONTROL, {"op": "abort", "reason": f"the source failed: {exc}"[:300]})
        except (ChannelError, TimeoutError):
            pass

    async def _arm_or_not(self) -> None:
        try:
            await self.arm()
        except AuthError:
            raise
        except NetpassError as exc:
            if not self.o.best_effort:
                raise
            self.say(f"netpass could not arm ({exc}); --best-effort: migrating WITHOUT netpass")
            self.notes.append(f"best effort: migrated without netpass because: {exc}")
            self.netpass_active = False
            await self.undo.aclose()  # undo what the arm did so far
            self.nics.clear()
            self.undo = AsyncExitStack()
            self.host = Host(self, self.undo, self._step)
            self.parking = Parking(self, self, self.host)
            await self._connect_monitor()

    def _write_pcap(self) -> None:
        """The frames the destination took for replay, as Wireshark reads them."""
        if not self.o.save_pcap or self.pcap_written is not None:
            return
        frames = sorted(self.pcap_frames, key=lambda f: f.ts_us)
        try:
            pcap.write(Path(self.o.save_pcap), [(self.t0_wall + f.ts_us / 1e6, f.data) for f in frames])
            self.pcap_written = len(frames)
        except NetpassError as exc:
            self.notes.append(str(exc))

    def report(self, error: BaseException | None = None) -> dict[str, Any]:
        live_ms = None if self.live_end_cpu is None else (self.live_end_cpu - self.cpu0) * 1000
        return srcreport.build(self, error, self.ch, (time.process_time() - self.cpu0) * 1000, live_ms)



async def migrate(opts: MigrateOptions, progress: Progress | None = None) -> dict[str, Any]:
    sess = SourceSession(opts, progress)
    try:
        return await sess.run()
    except BaseException as exc:
        exc.report = sess.final_report or sess.report(exc)  # type: ignore[attr-defined]
        raise
