"""The source QEMU's migration settings, each change undone at the end:
events on, ``downtime-limit`` 0 (so that QEMU switches over only once no
RAM is left, which the endgame sees coming), the bandwidth the endgame
sets; and the cancel, should netpass fail while QEMU migrates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack

from .endgame import THROTTLE_BANDWIDTH, handoff_reach, stays_throttled
from .errors import QMPError
from .qmp import QMP
from .session import Phase
from .srchost import Host
from .srcstate import SourceState
from .watch import ACTIVE

log = logging.getLogger(__name__)

# Attached to a migration under way, until netpass is armed: QEMU sends at
# most this (bytes/s), the endgame's throttle: one page a window.  A page of
# zeros costs QEMU about 9 bytes of stream, so at 256 KiB/s (the value
# before) a window could still clear 11 MB of them, and a small idle guest
# its whole RAM during an arm on a busy host.
HOLD_BACK_BPS = THROTTLE_BANDWIDTH


class QemuControl:
    def __init__(self, st: SourceState, mon: QMP, undo: AsyncExitStack, say: Callable[[str], None]) -> None:
        self.st, self.mon, self.undo, self.say = st, mon, undo, say
        self.held_back = False
        # Held back, and kept throttled at the arm: the RAM left then (see
        # endgame.handoff_reach); None once QEMU had its own bandwidth back.
        self.handed_off: int | None = None

    async def configure(self, host: Host, endgame: bool = True) -> None:
        """Events on, downtime-limit 0 (see endgame.py), each undone at the end.
        ``endgame``: one will follow the migration (else a hold-back always
        gives QEMU its bandwidth back at once)."""
        mon, st = self.mon, self.st
        caps = {c["capability"]: c["state"] for c in await mon.execute("query-migrate-capabilities")}
        st.external_pause = bool(caps.get("pause-before-switchover"))
        if st.external_pause:
            self.say("pause-before-switchover is on: a management layer owns it; netpass will "
                     "wait for it to continue")
        if not caps.get("events"):
            await self.set_capability("events", True)
            self.undo.push_async_callback(self.set_capability, "events", False)
        if self.held_back:  # (attached: the operator's values were read before the hold-back)
            await host.record_qemu_params(self._operator_params())
            if st.netpass_active and endgame and await self._stay_throttled():
                return
            await self.set_param("max-bandwidth", int(st.qemu_params.get("max-bandwidth", 0)))
            self.say("armed: QEMU migrates at its own bandwidth again")
            return
        st.qemu_params = await mon.execute("query-migrate-parameters")
        if not st.netpass_active:
            return
        await host.record_qemu_params(self._operator_params())
        await self.set_param("downtime-limit", 0)
        self.undo.push_async_callback(self.set_param, "downtime-limit",
                                      int(st.qemu_params.get("downtime-limit", 300)))
        # Whatever netpass does to the bandwidth, the operator's value comes back.
        self.undo.push_async_callback(self.set_param, "max-bandwidth",
                                      int(st.qemu_params.get("max-bandwidth", 0)))

    async def _stay_throttled(self) -> bool:
        """Armed, after a hold-back: with little enough RAM left
        (``endgame.stays_throttled``), QEMU stays throttled and the endgame
        starts at its park, rather than race a run of zero pages that could
        clear the rest faster than a throttle lands."""
        asked = time.monotonic()
        info = await self.mon.execute("query-migrate")
        rtt = time.monotonic() - asked
        remaining = (info.get("ram") or {}).get("remaining")
        if info.get("status") != "active" or not isinstance(remaining, int):
            return False
        reach = handoff_reach(rtt)  # (for the messages)
        if not stays_throttled(remaining, rtt):
            log.info("session=%s armed with %d bytes of RAM left (beyond %d, QMP round trip %.1f ms): "
                     "QEMU migrates at its own bandwidth again", self.st.sid, remaining, reach, rtt * 1000)
            return False
        self.handed_off = remaining
        self.say(f"armed with {remaining >> 20} MiB of RAM left (within {reach >> 20} MiB): QEMU stays "
                 "throttled until the park, which lasts until it has sent the rest")
        return True

    def _operator_params(self) -> dict[str, int]:
        return {"downtime-limit": int(self.st.qemu_params.get("downtime-limit", 300)),
                "max-bandwidth": int(self.st.qemu_params.get("max-bandwidth", 0))}

    async def hold_back(self, host: Host) -> None:
        """A migration someone else started (libvirt) is under way and netpass
        is not armed yet: ``downtime-limit`` 0 (QEMU switches over only once
        no RAM is left) and a trickle of bandwidth (HOLD_BACK_BPS), so that
        the migration cannot end before the arm.  Both come back at the end;
        the bandwidth as soon as netpass is armed (``configure``)."""
        st = self.st
        st.qemu_params = await self.mon.execute("query-migrate-parameters")
        ops = self._operator_params()
        await host.record_qemu_params(ops)  # (the guard gives them back should netpass be killed)
        # The undo first: a hold-back cancelled while QEMU is being told still
        # gives the settings back.  Both in one command: one round trip fewer.
        self.undo.push_async_callback(self.set_param, "downtime-limit", ops["downtime-limit"])
        self.undo.push_async_callback(self.set_param, "max-bandwidth", ops["max-bandwidth"])
        await self.set_params({"downtime-limit": 0, "max-bandwidth": HOLD_BACK_BPS})
        self.held_back = True
        log.info("session=%s QEMU held back until the arm (downtime-limit 0, max-bandwidth %d B/s)",
                 st.sid, HOLD_BACK_BPS)

    async def set_capability(self, name: str, state: bool) -> None:
        try:
            await self.mon.execute("migrate-set-capabilities",
                                   {"capabilities": [{"capability": name, "state": state}]}, timeout=2)
        except QMPError as exc:
            log.info("session=%s could not set %s=%s (QEMU gone?): %s", self.st.sid, name, state, exc)

    async def set_param(self, name: str, value: int) -> None:
        await self.set_params({name: value})

    async def set_params(self, params: dict[str, int]) -> None:
        try:
            await self.mon.execute("migrate-set-parameters", params, timeout=2)
        except QMPError as exc:
            if self.st.phases.phase in (Phase.NEW, Phase.ARMED):
                raise
            # A source QEMU killed at completion: nothing left to restore.
            log.info("session=%s could not set %s (QEMU gone?): %s", self.st.sid, params, exc)

    async def cancel(self) -> bool:
        """netpass failed while QEMU migrates: cancel, so the VM stays where
        it is.  True if QEMU had completed the migration all the same."""
        try:
            info = await self.mon.execute("query-migrate", timeout=5)
            if info.get("status") in ("setup", "active", "pre-switchover", "device"):
                await self.mon.execute("migrate_cancel", timeout=5)
                for _ in range(200):
                    info = await self.mon.execute("query-migrate", timeout=5)
                    if info.get("status") not in ACTIVE:
                        break
                    await asyncio.sleep(0.025)
            return bool(info.get("status") == "completed")
        except QMPError as exc:
            log.warning("session=%s could not cancel the migration: %s", self.st.sid, exc)
            return False
