"""After QEMU completed: everything parked goes across, the destination
resumes, and the late tail (what the network still sends to the source
until it learns where the VM went) is caught and sent on until the network
is quiet here (the linger); or, when nothing more can cross, counted lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, NoReturn, Protocol

from .channel import RemoteError
from .errors import FramesLost, MigrationFailed, NetpassError
from .session import Phase
from .srcstate import SourceState

# Strict ordering: once the network delivers the VM's frames to the
# destination (or none came here after the resume) and none has come here
# for this long, the destination may let the live frames it holds go in
# after the forwarded ones (``settled``).  Waiting for the linger's end
# instead (300 ms quiet) kept a TCP flow's new segments held for as long
# (lab, 20 Mbit/s: the longest stall 280 ms, 70 ms over stop->resume).
# A frame still caught later goes in behind live ones: the report counts
# it in ``reordered_estimate``.
SETTLE_QUIET_S = 0.05


class TailIO(Protocol):
    """The session's I/O the tail needs."""

    @property
    def channel_error(self) -> NetpassError | None: ...

    def capture_now(self) -> None: ...

    async def ship_pending(self) -> None: ...

    async def send_json(self, obj: dict[str, Any]) -> None: ...

    async def reply(self, op: str, timeout: float) -> dict[str, Any]: ...

    def say(self, msg: str) -> None: ...


class Tail:
    def __init__(self, st: SourceState, io: TailIO) -> None:
        self.st, self.io = st, io

    async def switch_over(self, settling: asyncio.Task[None] | None) -> None:
        """The source completed: everything parked goes across, the
        destination resumes, the late tail is caught, and the agent reports."""
        st = self.st
        if settling is not None:
            await settling
        # Everything captured so far goes before the 'migrated' notice.
        self.io.capture_now()
        await self.io.ship_pending()
        await self.io.send_json({"op": "migrated", "resume": st.was_running})
        resumed = await self.io.reply("migrated", 90)
        st.resumed_t = time.monotonic()
        st.dest_status = str(resumed.get("status"))
        st.phases.reach(Phase.RESUMED)
        self.io.say(f"destination is {st.dest_status}; catching late frames")
        await self._linger()
        self.io.capture_now()
        for sn in st.nics:
            sn.park.unpark()  # no frame is steered away while the rest is read
        await asyncio.sleep(0.001)
        self.io.capture_now()
        await self.io.ship_pending()
        await self.io.send_json({"op": "end", "frames": st.shipped, "timeout": 10})
        st.dest_report = await self.io.reply("end", 30)
        st.phases.reach(Phase.DONE)
        if st.dest_status != "running" and st.was_running:
            raise MigrationFailed(f"the destination VM is '{st.dest_status}', not running")

    async def _linger(self) -> None:
        st = self.st
        assert st.resumed_t is not None
        quiet = st.o.linger_quiet_ms / 1000
        hard = st.resumed_t + st.o.linger_max_ms / 1000
        while True:
            now = time.monotonic()
            if now >= hard:
                st.notes.append(f"linger bound of {st.o.linger_max_ms} ms reached")
                return
            # Quiet is not enough while frames came here after the resume and
            # the destination has not yet seen the network deliver there: a
            # pause in the traffic would end the linger while the network
            # still sends here.
            if self.io.channel_error is not None:
                raise self.io.channel_error  # nothing more can cross (the park stays: counted)
            converged = st.direct_seen or st.last_frame_t <= st.resumed_t
            if now - st.resumed_t >= quiet and now - st.last_frame_t >= quiet and converged:
                return
            if st.o.strict_ordering and not st.settled_told and converged and \
                    min(now - st.resumed_t, now - st.last_frame_t) >= SETTLE_QUIET_S:
                await self._tell_settled()
            await asyncio.sleep(0.01)

    async def _tell_settled(self) -> None:
        """Strict ordering: every frame caught so far goes out, then word
        that no more is expected (see SETTLE_QUIET_S); the linger goes on."""
        self.st.settled_told = True
        self.io.capture_now()
        await self.io.ship_pending()
        await self.io.send_json({"op": "settled", "frames": self.st.shipped})

    async def count_lost(self, exc: BaseException) -> None:
        """The VM moved and nothing more can cross: the network still sends
        its frames here until it learns where the VM went.  The park keeps
        taking them, as the linger would, until the network is quiet here,
        so that each is counted lost (``channel_lost``) instead of vanishing
        unseen into the paused source VM's ring once the park ends."""
        st = self.st
        if not st.netpass_active or not isinstance(exc, NetpassError) or st.parked_t is None:
            return
        start = time.monotonic()
        quiet, hard = st.o.linger_quiet_ms / 1000, start + st.o.linger_max_ms / 1000
        self.io.say("the frames still sent here cannot cross: counting them until the network is quiet")
        while True:
            self.io.capture_now()
            st.outq.clear()  # nothing ships any more
            now = time.monotonic()
            if now - max(start, st.last_frame_t) >= quiet:
                return
            if now >= hard:
                st.notes.append(f"linger bound of {st.o.linger_max_ms} ms reached while counting the "
                                "frames that could not cross")
                return
            await asyncio.sleep(0.01)


def lost_after_completion(st: SourceState, exc: BaseException, channel_error: NetpassError | None) -> NoReturn:
    """The VM moved, and netpass cannot finish delivering its frames."""
    n = st.unconfirmed() if st.netpass_active else 0
    if not isinstance(exc, NetpassError):
        raise exc
    if isinstance(channel_error, RemoteError):
        exc = channel_error  # what the agent said before the connection went
    if isinstance(exc, RemoteError) and exc.code == "dest_vm_gone":
        raise MigrationFailed(f"the migration completed, then {exc}: the VM runs on neither host "
                              "(the source QEMU keeps its state, paused); the frames netpass "
                              "held for it are lost with it") from exc
    raise FramesLost(f"{exc}; the migration completed: the VM runs on the destination, and "
                     f"{n} frame(s) netpass held were not confirmed delivered (counted in "
                     "frames_dropped.channel_lost)") from exc
