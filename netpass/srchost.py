"""The source's changes to this host, each with its undo registered the
moment it is made, and the guard that undoes them should netpass be
killed (``srcguard.py``): the nftables steering table, QEMU's tap fds
taken into this process, a parking tap, an injector and shadow rings per
NIC, and the VM's MAC pinned on the source bridge after the park.  The
blocking steps run off the event loop (``blocking.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from . import links, nft, sacrifice, srcguard, tapfd
from .blocking import off_loop
from .errors import MigrationFailed, NetpassError
from .nics import Nic
from .packet import Injector, ShadowRing
from .park import Park
from .srcstate import SourceNic, SourceState

log = logging.getLogger(__name__)


class Host:
    def __init__(self, st: SourceState, undo: AsyncExitStack, step: Callable[[str], None]) -> None:
        """``step``: called as each setup step is done (see source.ARM_STEPS)."""
        self.st, self.undo, self.step = st, undo, step
        self.guard: srcguard.Guard | None = None
        self.steering: nft.Steering | None = None

    def arm(self, found: list[Nic], pid: int) -> list[str]:
        """The arm's changes, in a worker thread (they can wait long in the
        kernel); the NICs go into the state.  What it has to say, as lines."""
        st = self.st
        said = self.start_guard()
        assert self.guard is not None
        self.steering = nft.Steering(f"netpass_{st.sid}")
        self.guard.record(nft_table=self.steering.table)
        self.undo.callback(self.steering.close)
        self.step("steering")
        pidfd = tapfd.pidfd_open(pid)
        try:
            for i, nic in enumerate(found):
                self._arm_nic(i, nic, pidfd, self.steering)
        finally:
            os.close(pidfd)
        return said

    def start_guard(self) -> list[str]:
        """Before the first change to this host (or to QEMU: attached, the
        hold-back comes first): should netpass be killed, its guard undoes
        what the state file lists by then.  What an earlier run's recovery
        did, as lines."""
        st = self.st
        if self.guard is not None:
            return []
        said = [f"cleanup of an earlier run: {line}" for line in srcguard.recover(st.o.state_dir)]
        self.guard = srcguard.Guard(st.o.state_dir, st.sid, st.o.qemu_address)
        self.guard.start()
        self.undo.callback(self.guard.close)
        self.step("guard")
        return said

    def _arm_nic(self, i: int, nic: Nic, pidfd: int, steering: nft.Steering) -> None:
        fds: list[int] = []
        for fd in nic.qemu_fds:
            fds.append(tapfd.pidfd_getfd(pidfd, fd))
            self.undo.callback(os.close, fds[-1])  # owned from the moment it is taken
        self.step("fds")
        for fd in fds:
            if not tapfd.is_nonblocking(fd):
                raise MigrationFailed(f"QEMU's fd for tap {nic.tap} is blocking; netpass cannot read it safely")
        info = links.info(None, nic.tap)
        park = Park.open(nic.tap, steering, self.undo)
        self.step("park")
        inject = Injector(nic.tap, bypass=True, mark=nft.OWN_MARK)
        self.undo.callback(inject.close)
        self.step("inject")
        mac_bytes = bytes.fromhex(nic.mac.replace(":", ""))
        queues = links.active_queues(nic.tap) if len(fds) > 1 else 1
        sn = SourceNic(index=i, nic=nic, fds=fds, hdr_size=tapfd.vnet_hdr_size(fds[0]),
                       mac_bytes=mac_bytes, park=park, inject=inject,
                       tx_dropped0=info.tx_dropped,
                       sacrificial=sacrifice.per_queue(mac_bytes, self.st.sid.encode(), queues))
        if info.master:
            sn.bridge = links.name_of(None, info.master)
        self.st.nics.append(sn)
        for q in range(queues):
            # (the kernel fills it: nothing per frame here until a stop netpass did not foresee)
            sn.shadows.append(ShadowRing(nic.tap, q if queues > 1 else None))
            self.undo.callback(sn.shadows[-1].close)
        self.step("shadow")

    async def record_qemu_params(self, params: dict[str, Any]) -> None:
        """QEMU's parameters as they were, for the guard to restore."""
        if self.guard is not None:
            await off_loop(functools.partial(self.guard.record, qemu_params=params))

    async def pin_all(self) -> None:
        """Off the critical path, after the park: pin each VM MAC to its tap
        on the source bridge, so the bridge keeps sending the VM's frames
        here (into the park) after the destination's announcement."""
        for sn in self.st.nics:
            if sn.bridge and not sn.pinned:
                try:
                    if self.guard is not None:
                        await off_loop(self.guard.pin, sn.nic.tap, sn.nic.mac)
                    await asyncio.to_thread(links.pin_mac, None, sn.nic.tap, sn.nic.mac)
                    sn.pinned = True
                    self.undo.push_async_callback(self._unpin, sn)
                except NetpassError as exc:
                    self.st.notes.append(f"could not pin {sn.nic.mac} on {sn.bridge}: {exc}")

    async def _unpin(self, sn: SourceNic) -> None:
        try:
            await asyncio.to_thread(links.unpin_mac, None, sn.nic.tap, sn.nic.mac)
        except NetpassError as exc:
            log.warning("session=%s unpin %s: %s", self.st.sid, sn.nic.mac, exc)
            return
        sn.pinned = False
        if self.guard is not None:
            await off_loop(self.guard.unpin, sn.nic.tap, sn.nic.mac)

    def read_overflow(self) -> None:
        """Frames the rings dropped: the VM's own since arm time (not drained
        in time after an unforeseen stop) and the parking tap's."""
        for sn in self.st.nics:
            if sn.ring_overflow is None:
                try:  # (the tap is gone with a killed QEMU once our fds are closed: then unknown)
                    sn.ring_overflow = links.tx_dropped(sn.nic.tap) - sn.tx_dropped0
                except NetpassError:
                    pass
            if sn.park_overflow is None:
                sn.park_overflow = sn.park.dropped()
                if sn.park_overflow:
                    sn.drop("parking_ring_full", sn.park_overflow)
