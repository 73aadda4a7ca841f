"""After a stop netpass did not foresee: which frame QEMU holds, and the
frames netpass reads from the VM's own rings meanwhile.

The stop came before netpass parked (a management layer's ``stop``, or
QEMU's own in a window that ended in zero pages), or before QEMU had read
every sacrificial frame.  Then QEMU's reader of a queue may hold a real
frame it can no longer hand to the stopped guest.  :class:`Settlement`
finds out which, with a second sacrificial frame per queue and the queue's
shadow ring (the pure part is :mod:`stopaccount`), and puts it first in
line to cross; :class:`VmRings` reads what reaches the VM's rings
meanwhile, since the stopped VM no longer does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack

from . import links, sacrifice, stopaccount, tapfd, wire
from .errors import NetpassError, QMPError
from .nics import rx_without_buffer, used_lengths, used_tail
from .packet import ShadowRing
from .qmp import QMP
from .srcstate import SourceNic, SourceState

log = logging.getLogger(__name__)

# After a stop netpass did not foresee: a frame on its way into the VM's
# ring when the park went on gets there within this.
PARK_SETTLE_S = 0.001
# ... and QEMU's main loop answers this many QMP commands, one after the
# other, with netpass's frame in a queue's ring: a reader still free has
# taken it by then (QEMU reads a readable tap in the same loop iteration).
SETTLE_ROUNDS = 2
# After QEMU's own stop: the guest's last RX buffers read per queue, to
# tell whether QEMU dropped a frame at its stop (stopaccount.MIN_EVIDENCE).
USED_WINDOW = 32
SETTLE_BOUND_S = 60.0  # (a management layer's pause can be long; QEMU answers meanwhile)


class VmRings:
    """netpass reading the VM's own rings: after a stop it did not foresee,
    what reaches them is netpass's to carry."""

    def __init__(self, st: SourceState) -> None:
        self.st = st
        self.readers: list[int] = []

    def read(self, sn: SourceNic, fd: int) -> None:
        self.st.took_from_vm_ring(sn, fd, tapfd.drain(fd, 256), time.monotonic())

    def start(self, undo: AsyncExitStack) -> None:
        """Read them now, and whenever they become readable (until ``undo``
        unwinds, or :meth:`stop`)."""
        self.st.vm_rings_drained = True
        loop = asyncio.get_running_loop()
        for sn in self.st.nics:
            for fd in sn.fds:
                self.read(sn, fd)
                loop.add_reader(fd, self.read, sn, fd)
                self.readers.append(fd)
                undo.callback(remove_reader, fd)

    def stop(self) -> None:
        for fd in self.readers:
            remove_reader(fd)
        self.readers.clear()


def remove_reader(fd: int) -> None:
    try:
        asyncio.get_running_loop().remove_reader(fd)
    except (RuntimeError, ValueError):
        pass


class Settlement:
    def __init__(self, st: SourceState, mon: QMP | None, rings: VmRings) -> None:
        self.st, self.mon, self.rings = st, mon, rings

    async def run(self, starved: asyncio.Task[None] | None) -> None:
        """After a stop QEMU made before it had read every sacrificial frame
        (or before netpass parked at all): which real frame does it hold?

        After its stop QEMU's reader of each queue reads one more frame, if
        the ring holds one, and keeps it; one that held a frame for want of
        a guest buffer reads nothing more.  So netpass empties the rings at
        once (what they hold is netpass's to carry) and puts a second
        sacrificial frame into each queue: a free reader takes it, and so
        swallowed nothing real; a holding reader leaves it.  A reader that
        leaves it while QEMU answers ``SETTLE_ROUNDS`` QMP commands holds a
        frame: netpass's own first sacrificial frame, unless netpass read
        that one back, or else the real frame it read last
        (:mod:`stopaccount`), which the queue's shadow ring has a copy of:
        it goes across first.  Should the source QEMU go before its readers
        decided, the report says so (``swallowed_account: unknown``).

        Meanwhile nothing ships, so that the frame QEMU holds goes before
        the ones netpass read after it.
        """
        try:
            await asyncio.sleep(PARK_SETTLE_S)
            self.rings.stop()  # from here on QEMU alone reads the rings
            for sn in self.st.nics:
                for fd in sn.fds:
                    self.rings.read(sn, fd)
            seconds = self._send_seconds()
            decided = await self._readers_decided([fd for sn in self.st.nics for fd in sn.fds])
            left = self._left(seconds)
            if starved is not None:
                try:  # (asked at the stop; answered once QEMU's main loop ran, or failed with QEMU gone)
                    async with asyncio.timeout(2):
                        await asyncio.shield(starved)
                except TimeoutError:
                    pass
            self.st.stopped_by_migration = await self._stopped_by_migration()
            if self.st.stopped_by_migration:
                await self.ask_used()
            await asyncio.sleep(2 * ShadowRing.RETIRE_MS / 1000 + 0.002)  # the last blocks handed over
            recovered = [f for sn in self.st.nics for f in self._settle_nic(sn, left, seconds, decided)]
            if self.st.stopped_by_migration:
                untold = sum(not sn.told(q) for sn in self.st.nics for q in range(len(sn.sacrificial)))
                if untold:
                    self.st.notes.append(
                        "QEMU stopped the VM to complete the migration before netpass parked: a frame its tap "
                        f"reader took while the vCPUs stopped (at most one per queue; {untold} queue(s) where "
                        "the guest's receive queue could not tell) is dropped at the stop, and cannot be named")
            self.st.outq.extendleft(reversed(recovered))
        finally:
            self.st.settling = False

    def _send_seconds(self) -> dict[bytes, tuple[SourceNic, int]]:
        """A second sacrificial frame into each queue: frame -> (NIC, queue)."""
        seconds: dict[bytes, tuple[SourceNic, int]] = {}
        for sn in self.st.nics:
            for q, first in enumerate(sn.sacrificial):
                f = sacrifice.second(first)
                sn.own_set.add(f)
                if sn.own.send(bytes(wire.VNET_HDR_LEN), f):
                    seconds[f] = (sn, q)
        return seconds

    def _left(self, seconds: dict[bytes, tuple[SourceNic, int]]) -> dict[tuple[int, int], int]:
        """Empty the rings: (NIC, queue) whose reader left its second frame ->
        the queue's fd; the real frames found go to the capture."""
        left: dict[tuple[int, int], int] = {}
        for sn in self.st.nics:
            for fd in sn.fds:
                rest = []
                bufs = tapfd.drain(fd, 4096)
                sn.vm_ring_drained += len(bufs)
                for buf in bufs:
                    owner = seconds.get(buf[sn.hdr_size:])
                    if owner is not None:
                        left[(owner[0].index, owner[1])] = fd
                    else:
                        rest.append(buf)
                self.st.take(sn, rest, sn.hdr_size, time.monotonic())
        return left

    def _settle_nic(self, sn: SourceNic, left: dict[tuple[int, int], int],
                    seconds: dict[bytes, tuple[SourceNic, int]], decided: bool) -> list[wire.Frame]:
        """What each of ``sn``'s queues' readers held, and the frames recovered for them."""
        recovered: list[wire.Frame] = []
        mine = {q: fd for (n, q), fd in left.items() if n == sn.index}
        holding = self._holding(sn, mine, seconds, decided)
        sn.qemu_held = 0 if holding is not None else None
        for q in range(len(sn.sacrificial)):
            held = holding is not None and q in holding and \
                (self.st.unforeseen or sn.sacrificial[q] in sn.own_seen)
            if holding is None and q in mine:
                sn.undecided += 1
            if held:
                sn.qemu_held = (sn.qemu_held or 0) + 1
            if held or sn.starved.get(q) or q in sn.used_lens:
                recovered += self._recover(sn, q, mine.get(q), held)
        if sn.undecided:
            self.st.notes.append(f"{sn.nic.tap}: the source QEMU went before netpass could tell whether "
                                 f"it kept a frame at its stop ({sn.undecided} queue(s))")
        return recovered

    async def _stopped_by_migration(self) -> bool:
        """Whether QEMU's migration stopped the VM (to complete), rather than
        a management layer's ``stop`` while it ran: the migration has left
        'active' by now (or QEMU is gone).  QEMU's migration thread stops the
        vCPUs without holding QEMU's main lock, so its tap reader may take a
        frame meanwhile, which the stop then drops (seen in the lab: one or
        two lost per such stop, the second the one its reader then holds)."""
        if self.st.completed or self.mon is None:
            return True
        try:
            info = await self.mon.execute("query-migrate", timeout=1)
        except QMPError:
            return True
        return bool(info.get("status") != "active")

    def _holding(self, sn: SourceNic, left: dict[int, int], seconds: dict[bytes, tuple[SourceNic, int]],
                 decided: bool) -> set[int] | None:
        """The queues whose reader holds a frame (it left its second
        sacrificial frame), or None when that cannot be told: the source
        QEMU went first, and its reads since the stop do not settle it.
        Those reads are the tap's ``tx_packets`` since netpass saw the stop,
        less netpass's own: one per second frame taken, one per real frame
        taken (its reader took it after netpass saw the stop, if it did not
        read it before, which those counts cannot tell)."""
        if decided:
            return set(left)
        if not self.st.unforeseen or sn.tx_at_stop is None:
            return None
        try:
            ours = sn.vm_ring_drained - sn.reads_at_stop
            qemu_reads = links.tx_packets(sn.nic.tap) - sn.tx_at_stop - ours
        except NetpassError:
            return None
        taken = sum(1 for owner in seconds.values() if owner[0] is sn) - len(left)
        if left and qemu_reads - taken == len(left):
            return set(left)  # (each reader took one real frame after netpass saw the stop)
        return None  # (none since then: any it took came before, or never)

    def _recover(self, sn: SourceNic, q: int, fd: int | None, held: bool) -> list[wire.Frame]:
        """From queue ``q``'s shadow ring: the frame its reader holds after
        the stop (``held``), after the one QEMU purged at the stop if the
        guest had no RX buffer then; what cannot be named is counted lost.
        ``fd``: the queue's (None if unknown: its reader took its frame)."""
        starved = bool(sn.starved.get(q))
        used = None if starved else sn.used_lens.get(q)  # (starved: the purge at the stop is that frame)
        tail = sn.used_tails.get(q)
        want = int(held) + int(starved)
        shadow = sn.shadows[q] if q < len(sn.shadows) else None
        kept = [(v, d) for v, d in shadow.frames() if d not in sn.own_set] \
            if shadow is not None and shadow.map is not None else []
        datas = [d for _v, d in kept]
        answers: set[tuple[int, ...]] = set()
        told: set[str] = set()  # what the used ring told, for each fd tried (see _window)
        if shadow is not None and shadow.dropped:
            self.st.notes.append(f"{sn.nic.tap}: its shadow ring missed {shadow.dropped} frame(s): what QEMU "
                                 "kept at its stop cannot be named")
        elif kept:
            for f in [fd] if fd is not None else stopaccount.fds_of_queue(datas, sn.drained, sn.fds):
                drained = sn.drained.get(f, [])
                found = [stopaccount.last_read_before_stop(datas, drained, held)] if starved else []
                if used is not None:
                    kind, i = self._window(datas, drained, held, used, tail)
                    told.add(kind)
                    if kind in ("dropped", "mismatch"):
                        found.append(i)
                if held:
                    found.append(stopaccount.last_read_by_qemu(datas, drained))
                if None not in found:
                    answers.add(tuple(i for i in found if i is not None))
        verdict = stopaccount.agreed_verdict(told)
        if len(answers) == 1 and verdict is not None:
            sn.window[q] = verdict
        chosen = answers.pop() if len(answers) == 1 else ()
        if sn.window.get(q):
            want += 1
        if len(chosen) < want:
            sn.drop("taken_by_qemu_at_its_stop", want - len(chosen))
            self.st.notes.append(f"{sn.nic.tap}: {want - len(chosen)} frame(s) QEMU kept at its stop could not "
                                 "be named from its shadow ring")
        out = []
        now = int((time.monotonic() - self.st.t0) * 1e6)
        for i in chosen:
            vnet, data = kept[i]
            sn.captured += 1
            sn.bytes_captured += len(data)
            sn.recovered += 1
            out.append(wire.Frame(sn.index, vnet, data, now))
            log.info("session=%s %s: QEMU took a frame at its stop (queue %d, %d of %d kept%s): sent on from "
                     "the shadow ring (%s)", self.st.sid, sn.nic.tap, q, i + 1, len(kept),
                     ", the guest had no RX buffer" if starved else "", data[:48].hex())
        return out

    def _window(self, datas: list[bytes], drained: list[bytes], held: bool,
                used: list[int], tail: bytes | None) -> tuple[str, int | None]:
        """What the guest's used ring (and its last buffer's first bytes,
        ``tail``) tells of the frame QEMU's reader took while the vCPUs
        stopped: ("dropped", its index in ``datas``), ("got", None) when the
        guest has it or there was none, ("untold", None), or ("mismatch",
        None) when the shadow does not end with ``drained``."""
        last = stopaccount.last_read_by_qemu(datas, drained)
        if last is None:
            return "mismatch", None
        decided, dropped = stopaccount.dropped_in_stop_window(list(map(len, datas)), last, held, used, datas, tail)
        if not decided:
            log.info("session=%s the guest's used ring does not tell: its last buffers %s, the shadow's last "
                     "frames %s (the last QEMU read: %d of %d, held %s); the last buffer begins %s",
                     self.st.sid, used[-12:], [len(d) for d in datas[max(0, last - 11):last + 1]], last + 1,
                     len(datas), held, tail[:64].hex() if tail is not None else "unread")
            return "untold", None
        return ("got", None) if dropped is None else ("dropped", dropped)

    async def ask_used(self) -> None:
        """After QEMU's own stop: the lengths of the guest's last RX
        buffers on each queue, and the first bytes of the last of them
        (see :meth:`_window`); a queue left out when QEMU cannot say."""
        for sn in self.st.nics:
            if sn.vdev is None or self.mon is None:
                continue
            for q in range(len(sn.sacrificial)):
                try:
                    sn.used_lens[q] = await used_lengths(self.mon, sn.vdev, q, USED_WINDOW)
                except (QMPError, KeyError, TypeError, ValueError) as exc:
                    log.info("session=%s cannot read the used ring of RX queue %d of %s after the stop: %s",
                             self.st.sid, q, sn.nic.mac, exc)
                    continue
                try:
                    tail = await used_tail(self.mon, sn.vdev, q)
                except (QMPError, KeyError, TypeError, ValueError) as exc:
                    log.info("session=%s cannot read the last used buffer of RX queue %d of %s after the stop: %s",
                             self.st.sid, q, sn.nic.mac, exc)
                    continue
                if tail is not None:
                    sn.used_tails[q] = tail

    async def ask_starved(self) -> None:
        """Whether the guest had an RX buffer on each queue at the stop (see
        :meth:`_recover`): the VM is stopped when this is asked."""
        for sn in self.st.nics:
            if sn.vdev is None or self.mon is None:
                continue
            for q in range(len(sn.sacrificial)):
                try:
                    sn.starved[q] = await rx_without_buffer(self.mon, sn.vdev, q)
                except (QMPError, KeyError, TypeError, ValueError) as exc:
                    log.info("session=%s cannot read RX queue %d of %s after the stop: %s", self.st.sid, q,
                             sn.nic.mac, exc)
                    return

    async def _readers_decided(self, fds: list[int]) -> bool:
        """Wait until QEMU's readers have taken the second sacrificial frames
        or QEMU's main loop has run ``SETTLE_ROUNDS`` times since they were
        queued (a free reader has then taken its own); False if the source
        QEMU went first."""
        watch = tapfd.Watch(fds)
        deadline = time.monotonic() + SETTLE_BOUND_S
        rounds = 0
        while watch.readable() and rounds < SETTLE_ROUNDS:
            if self.mon is None or time.monotonic() > deadline:
                return False
            try:  # (answered by QEMU's main loop, once the migration thread lets it run)
                await self.mon.execute("query-status", timeout=max(0.1, deadline - time.monotonic()))
            except QMPError:
                return not watch.readable()
            rounds += 1
        return True
