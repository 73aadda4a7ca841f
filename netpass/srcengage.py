"""The park, planned: just before the window in which QEMU will send the
last of the RAM, every frame bound for the VM goes to its parking tap, one
sacrificial frame goes into each of the VM tap's queues, and once QEMU has
read them (its readers are free and its rings empty) the bandwidth comes
back so that QEMU finishes.  The stop then swallows nothing netpass does
not know of.  Also the park at a stop netpass did not foresee, and the word
to the destination that the park is near (``prepare``) or on (``stopped``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Protocol

from . import tapfd, wire
from .endgame import THROTTLE_BANDWIDTH, Endgame, Sample, Step
from .qmp import QMP
from .session import Phase
from .srchost import Host
from .srcqemu import QemuControl
from .srcstate import SourceState

log = logging.getLogger(__name__)

# The lab's trace of every sample the endgame took (docs/lab.md).
_TRACE = open(os.environ["NETPASS_ENDGAME_TRACE"], "a") if os.environ.get("NETPASS_ENDGAME_TRACE") else None

VERIFY_BOUND_S = 2.0  # QEMU reads the sacrificial frames within this, or netpass says it did not
# At the engage, how long the bandwidth waits for QEMU to read the sacrificial
# frames (see Parking.engage): a few windows.
ENGAGE_VERIFY_BOUND_S = 0.5


class ParkIO(Protocol):
    async def send_json(self, obj: dict[str, Any]) -> None: ...


def log_failure(task: asyncio.Task[Any]) -> None:
    """A background step's done-callback: its failure is logged, not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background step failed: %s", task.exception())


class Parking:
    def __init__(self, st: SourceState, io: ParkIO, host: Host) -> None:
        self.st, self.io, self.host = st, io, host

    async def follow(self, endgame: Endgame, info: dict[str, Any], asked: float, now: float,
                     qemu: QemuControl) -> None:
        """One ``query-migrate`` answer (asked at ``asked``, answered at
        ``now``) to the endgame, and its step taken: limit the bandwidth to
        plan the end, throttle it until the park, or engage."""
        st = self.st
        status, ram = str(info.get("status")), info.get("ram", {})
        endgame.qmp_answered(now - asked)
        st.qmp_rtt_s = max(st.qmp_rtt_s, 0.5 * st.qmp_rtt_s + 0.5 * (now - asked))
        step = endgame.feed(Sample(now, status, ram.get("remaining"), ram.get("transferred")))
        if _TRACE:
            _TRACE.write(f"{now:.6f} {status} {ram.get('remaining')} {ram.get('transferred')} "
                         f"{endgame.phase.value} {len(endgame.windows)} {step.value}\n")
        if step is Step.LIMIT:
            await qemu.set_param("max-bandwidth", endgame.max_bandwidth)
            log.info("session=%s %d bytes of RAM left, sent all along: QEMU limited to %d bytes/s "
                     "to plan the end", st.sid, ram.get("remaining"), endgame.max_bandwidth)
        elif step is Step.THROTTLE:
            # The throttle first: a run of zero pages may be finishing the RAM.
            await qemu.set_param("max-bandwidth", THROTTLE_BANDWIDTH)
            await self.prepare_destination()
            log.info("session=%s %d bytes of RAM left: QEMU throttled until the park",
                     st.sid, ram.get("remaining"))
        elif step is Step.ENGAGE:
            await self.engage(qemu.mon, endgame)

    async def engage(self, mon: QMP, endgame: Endgame) -> None:
        """Park every frame bound for the VM, send the sacrificial frames, wait
        until QEMU has read them, and only then let QEMU finish: all of it
        just before the window in which it will.  Should QEMU read them too
        late for that window (a busy host: its vCPU, or our loop, late), the
        bandwidth still waits for them: the stop then comes a window (100
        ms) later, with more frames parked and none lost; restored at the
        window instead, QEMU stopped before it had read them, and a frame it
        took then could be lost unaccounted (seen with a core kept busy).
        Only past ENGAGE_VERIFY_BOUND_S does the bandwidth come back
        unverified, and the account of the stop says so."""
        st = self.st
        t = time.monotonic()
        await self.park_all()
        for sn in st.nics:
            for s in sn.sacrificial:
                if not sn.own.send(bytes(wire.VNET_HDR_LEN), s):
                    st.notes.append(f"{sn.nic.tap}: the VM's ring was full: a sacrificial "
                                    "frame could not be queued")
        t_sac = time.monotonic()
        give_up = t + ENGAGE_VERIFY_BOUND_S
        watch = tapfd.Watch([fd for sn in st.nics for fd in sn.fds])
        while watch.readable() and time.monotonic() < give_up:
            await asyncio.sleep(0.0002)
        t_ver = time.monotonic()
        if not watch.readable():
            st.verified_t = t_ver
        # (a failure here fails the migration: the parked frames go back)
        await mon.execute("migrate-set-parameters", {"max-bandwidth": endgame.release_bandwidth()})
        t_end = time.monotonic()
        st.qmp_rtt_s = 0.7 * st.qmp_rtt_s + 0.3 * (t_end - t_ver)
        endgame.engaged(t_end - t)
        log.info("session=%s parked, verified %s and QEMU let go in %.1f ms (sacrificial frames read in "
                 "%.1f, QMP %.1f; aimed %.1f ms before the window)", st.sid,
                 "" if st.verified_t else "NOT", (t_end - t) * 1000, (t_ver - t_sac) * 1000,
                 (t_end - t_ver) * 1000, ((endgame.planned_start or t) - t) * 1000)
        if st.verified_t is None:
            asyncio.get_running_loop().create_task(self._verify()).add_done_callback(log_failure)
        await self.host.pin_all()

    async def prepare_destination(self) -> None:
        """The park is some tens of milliseconds away: the destination
        closes its hold now.  Closed only at the park, a fast switchover
        (no pause, a destination that resumes 40 ms after the stop) had the
        VM running there before the hold held anything, and live frames
        overtook the forwarded ones (lab: 43 and 48 replies reordered with
        strict ordering).  The hold is tight for seconds; the endgame parks
        within a few of its windows of 100 ms."""
        if not self.st.prepared:
            self.st.prepared = True
            await self.io.send_json({"op": "prepare"})

    async def park_all(self) -> None:
        if self.st.parked_t is not None:
            return
        if self.st.live_end_cpu is None:
            self.st.live_end_cpu = time.process_time()
        for sn in self.st.nics:
            sn.park.park()
        self.st.parked_t = time.monotonic()
        self.st.phases.reach(Phase.PARKED)
        # The destination starts holding what the network sends its VM
        # (and, with strict ordering, what its VM sends).
        await self.io.send_json({"op": "stopped"})

    async def _verify(self) -> None:
        """Wait until QEMU has read every sacrificial frame: its readers were
        free, so no real frame is held inside QEMU, and its rings are empty."""
        deadline = time.monotonic() + VERIFY_BOUND_S
        watch = tapfd.Watch([fd for sn in self.st.nics for fd in sn.fds])
        while watch.readable():
            if time.monotonic() > deadline:
                self.st.notes.append("QEMU did not read the sacrificial frames within "
                                  f"{VERIFY_BOUND_S:.0f} s of the park")
                return
            await asyncio.sleep(0.0002)
        self.st.verified_t = time.monotonic()
