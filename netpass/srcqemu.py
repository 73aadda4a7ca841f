"""The source QEMU's migration settings, each change undone at the end:
events on, ``downtime-limit`` 0 (so that QEMU switches over only once no
RAM is left, which the endgame sees coming), the bandwidth the endgame
sets; and the cancel, should netpass fail while QEMU migrates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack

from .errors import QMPError
from .qmp import Monitor
from .session import Phase
from .srchost import Host
from .srcstate import SourceState
from .watch import ACTIVE

log = logging.getLogger(__name__)


class QemuControl:
    def __init__(self, st: SourceState, mon: Monitor, undo: AsyncExitStack, say: Callable[[str], None]) -> None:
        self.st, self.mon, self.undo, self.say = st, mon, undo, say

    async def configure(self, host: Host) -> None:
        """Events on, downtime-limit 0 (see endgame.py), each undone at the end."""
        mon, st = self.mon, self.st
        caps = {c["capability"]: c["state"] for c in await mon.execute("query-migrate-capabilities")}
        st.external_pause = bool(caps.get("pause-before-switchover"))
        if st.external_pause:
            self.say("pause-before-switchover is on: a management layer owns it; netpass will "
                     "wait for it to continue")
        if not caps.get("events"):
            await self.set_capability("events", True)
            self.undo.push_async_callback(self.set_capability, "events", False)
        st.qemu_params = await mon.execute("query-migrate-parameters")
        if not st.netpass_active:
            return
        await host.record_qemu_params({
            "downtime-limit": int(st.qemu_params.get("downtime-limit", 300)),
            "max-bandwidth": int(st.qemu_params.get("max-bandwidth", 0))})
        await self.set_param("downtime-limit", 0)
        self.undo.push_async_callback(self.set_param, "downtime-limit",
                                      int(st.qemu_params.get("downtime-limit", 300)))
        # Whatever netpass does to the bandwidth, the operator's value comes back.
        self.undo.push_async_callback(self.set_param, "max-bandwidth",
                                      int(st.qemu_params.get("max-bandwidth", 0)))

    async def set_capability(self, name: str, state: bool) -> None:
        try:
            await self.mon.execute("migrate-set-capabilities",
                                   {"capabilities": [{"capability": name, "state": state}]}, timeout=2)
        except QMPError as exc:
            log.info("session=%s could not set %s=%s (QEMU gone?): %s", self.st.sid, name, state, exc)

    async def set_param(self, name: str, value: int) -> None:
        try:
            await self.mon.execute("migrate-set-parameters", {name: value}, timeout=2)
        except QMPError as exc:
            if self.st.phases.phase in (Phase.NEW, Phase.ARMED):
                raise
            # A source QEMU killed at completion: nothing left to restore.
            log.info("session=%s could not set %s=%s (QEMU gone?): %s", self.st.sid, name, value, exc)

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
