"""The replay into the destination VM: the batches the source sends are
checked and kept (``pending.py``), and fed into the VM tap's ring within
its room (the agent's TX ring); the ring's level is followed from the
tap's counters and the frames the network delivers here itself (which the
replay must not duplicate); the source hears how many frames are in.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from . import links, tapfd, wire
from .blocking import off_loop
from .channel import CONTROL, Channel, ChannelError
from .deststate import DestNic, DestState
from .errors import NetpassError, SessionError
from .metrics import AgentMetrics
from .nics import Nic
from .packet import Tally, TxRing
from .pending import retained

log = logging.getLogger(__name__)

# The agent tells the source how many frames it has put into the VM's rings
# (besides each batch's ack) once FED_REPORT_FRAMES more are in, or, for
# fewer, FED_REPORT_S after its last report.  What it fed and had not yet
# reported when it vanished is counted lost: a backlog fed at thousands of
# frames per second must not leave a timer's worth of them (a CI saw 133).
FED_REPORT_S = 0.02
FED_REPORT_FRAMES = 32


class ReplayIO(Protocol):
    def on_exit(self, what: str, fn: Callable[..., Any], *args: Any) -> None: ...


# How many frames a destination tap's ring holds now (Replay.ring_level
# reads the kernel; a test gives its own).
Gauge = Callable[[DestNic], int]


class Replay:
    def __init__(self, st: DestState, ch: Channel, metrics: AgentMetrics | None, io: ReplayIO | None = None,
                 gauge: Gauge | None = None) -> None:
        """``io``: where the undo of what :meth:`take_nics` takes goes;
        ``gauge``: the rings' level (None: the kernel's, :meth:`ring_level`)."""
        self.st, self.ch, self.metrics, self.io = st, ch, metrics, io
        self.gauge: Gauge = gauge or self.ring_level
        self.fed_told, self.fed_told_t = 0, 0.0
        self.to_source = True  # tell the source what is fed (the bench's session has no source)

    def take_nics(self, nics: list[Nic], pid: int, step: Callable[[str], None]) -> None:
        """The destination VM's tap fds, TX rings and tallies: each
        registers its undo as it is taken (in a worker thread)."""
        assert self.io is not None
        pidfd = tapfd.pidfd_open(pid)
        try:
            for nic in nics:
                fds: list[int] = []
                for qfd in nic.qemu_fds:  # each fd owned from the moment it is ours
                    fd = tapfd.pidfd_getfd(pidfd, qfd)
                    self.io.on_exit(f"closing {nic.tap}'s fd", os.close, fd)
                    fds.append(fd)
                step("fds")
                info = links.info(None, nic.tap)
                ring = TxRing(nic.tap)
                # (closing a packet ring waits for a grace period too: off the loop)
                self.io.on_exit(f"closing {nic.tap}'s TX ring", off_loop, ring.close)
                step("ring")
                tally = Tally(nic.tap)
                self.io.on_exit(f"closing {nic.tap}'s tally", off_loop, tally.close)
                step("tally")
                dn = DestNic(nic=nic, ring=ring, fds=fds, orig_qlen=info.txqueuelen,
                             mac_bytes=bytes.fromhex(nic.mac.replace(":", "")), tally=tally)
                self.io.on_exit(f"closing {nic.tap}'s counter", _close_counter, dn)
                self.st.nics.append(dn)
                # The ring is used at its size: changing txqueuelen on a live
                # tap drops frames; what does not fit is fed as the VM reads.
                dn.mark_tx = dn.tx0 = info.tx_packets
                dn.tx_dropped0 = info.tx_dropped
        finally:
            os.close(pidfd)

    def replay_read(self) -> bool:
        """Every forwarded frame this agent has is inside the VM: none waits
        to be fed, and the VM has read the last one fed."""
        return not any(dn.pending for dn in self.st.nics) and all(self.consumed(dn) for dn in self.st.nics)

    def ring_level(self, dn: DestNic) -> int:
        """Frames in the tap's ring now, whoever put them there.

        Frames enter from the network (the shadow counts them) and from us;
        QEMU's reads are tx_packets.  Whenever the ring is seen empty,
        everything entered so far is read: that is a mark to count from.
        """
        self.pull_direct(dn)
        tx = dn.read_tx()
        if dn.first_read_t is None and tx > dn.tx0:
            dn.first_read_t = time.monotonic()
        entered = dn.live_enqueued + dn.replayed
        if dn.ring_empty():
            dn.mark_enq, dn.mark_tx = entered, tx
        return max(0, entered - dn.mark_enq - (tx - dn.mark_tx))

    def room(self, dn: DestNic) -> int:
        """Frames we may still queue.  Without a hold, half the ring stays
        free for live frames that arrive meanwhile: a VM slow to start
        reading would otherwise see them dropped by a full ring (seen)."""
        ring = dn.orig_qlen or 500
        # Before the VM runs, with the hold closed, nothing else enters; once
        # it runs, the hold's paced release aims at half the ring too.
        share = ring * 3 // 4 if self.st.hold_closed and not self.st.running else ring // 2
        return max(0, share - self.gauge(dn) - self.granted_ahead(dn))

    @staticmethod
    def granted_ahead(dn: DestNic) -> int:
        """Live frames the hold's current window still lets into the ring.
        A straggler replayed while a window is open shares the ring with
        them: counting only what is in the ring, the two could fill more
        than it holds should the VM stall (window_top plus half the ring)."""
        w, h = dn.window, dn.hold
        if w is None or h is None or h.removed or h.stats.rx_released_t is not None:
            return 0
        return max(0, w.granted - (dn.live_enqueued - w.entered0))

    def feed(self) -> None:
        for dn in self.st.nics:
            if not dn.pending:
                continue
            room = self.room(dn)
            while dn.pending and room > 0:
                try:
                    asked, taken = dn.pending.replay(dn.ring, room)
                except NetpassError as exc:
                    log.warning("session=%s replay failed on %s: %s", self.st.sid, dn.nic.tap, exc)
                    self.st.cache_bytes -= dn.pending.pop(1)
                    dn.drop("inject_error")
                    continue
                self.st.cache_bytes -= dn.pending.pop(taken)
                dn.replayed += taken
                if dn.live_at_stop is not None and dn.live_enqueued > dn.live_at_stop:
                    # Frames the network delivered here after the source VM
                    # stopped are ahead of these older ones in the ring.
                    dn.reordered += taken
                room -= taken
                dn.last_pos = dn.live_enqueued + dn.replayed
                if taken:
                    self.st.unconsumed = True
                if taken < asked:
                    break  # the ring is full after all: again once QEMU has read

    async def tell_fed(self) -> None:
        fed = self.st.fed()
        if not self.to_source or fed == self.fed_told:
            return
        if fed - self.fed_told >= FED_REPORT_FRAMES or time.monotonic() >= self.fed_told_t + FED_REPORT_S:
            self.fed_told, self.fed_told_t = fed, time.monotonic()
            try:
                await self.ch.send_json(CONTROL, {"op": "fed", "fed": fed})
            except ChannelError:
                pass  # the session's receive says why

    def pull_direct(self, dn: DestNic) -> None:
        """Count the frames the network delivers to the destination tap itself.

        Broadcasts, and anything else the LAN floods, reach both hosts during
        the switchover; the destination's own copy reaches the VM, so the copy
        captured on the source must not be replayed too.  Our own replays
        bypass the transmit path and are not seen here.
        """
        if dn.shadow is None:
            # A hold mirrors the live frames (from its install to its removal,
            # which comes once the source is done): only their count matters here.
            if dn.tally is not None:  # (none: nothing enters that NIC's ring but the replay)
                dn.live_enqueued += dn.tally.count()
            return
        dn.shadow.pull()
        steered = dn.hold is not None and dn.hold.stats.rx_released_t is None and not dn.hold.removed
        while dn.shadow.frames:
            _idx, _vnet, data = dn.shadow.frames.popleft()
            dn.live_enqueued += 1
            if not steered:  # while the hold steers, its mirror sees the live frames first
                self.count_direct(dn, data)
                self._maybe_tell_direct(dn, data)

    def pull_mirror(self, dn: DestNic) -> None:
        """Live frames the hold took: delivered later, but delivered."""
        if dn.hold is not None:
            now = time.monotonic()
            for data in dn.hold.read_mirror():
                self.count_direct(dn, data)
                dn.held_times.append(now)
                self._maybe_tell_direct(dn, data)

    def _maybe_tell_direct(self, dn: DestNic, data: bytes) -> None:
        """The network now delivers the VM's unicast frames here: tell the
        source, whose late tail can then end with a quiet period (a pause in
        the traffic alone must not end it: frames could still come there)."""
        if self.st.direct_told or not self.st.running or data[:6] != dn.mac_bytes:
            return
        self.st.direct_told = True
        log.info("session=%s the network delivers the VM's frames here directly", self.st.sid)
        task = asyncio.get_running_loop().create_task(self.ch.send_json(CONTROL, {"op": "direct"}))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    @staticmethod
    def count_direct(dn: DestNic, data: bytes) -> None:
        key = hash(data)
        dn.direct[key] = dn.direct.get(key, 0) + 1
        if data[:6] == dn.mac_bytes:
            dn.direct_unicast += 1
        if len(dn.direct) > 1_000_000:
            dn.direct.clear()  # bounded; only the switchover's frames matter
            dn.direct_unicast = 0

    def consumed(self, dn: DestNic) -> bool:
        """Whether the VM has read the last frame we queued on this NIC.

        The ring is FIFO.  Frames enter it from the network (the shadow counts
        them) and from us; QEMU's reads are tx_packets.  Whenever the ring is
        seen empty, everything entered so far is read: that is a mark.  From
        the last mark, the read count says how far into the ring QEMU is.
        """
        level = self.gauge(dn)  # (the kernel's: pulls the shadow, moves the mark)
        # Frames read so far = frames entered less those still in the ring.
        return dn.live_enqueued + dn.replayed - level >= dn.last_pos

    def mark_stop(self) -> None:
        for dn in self.st.nics:
            if dn.live_at_stop is None:
                self.pull_direct(dn)
                dn.live_at_stop = dn.live_enqueued

    def accept(self, blob: bytes | bytearray | memoryview, feed: bool = True) -> dict[str, Any]:
        return self.accept_batch(wire.decode(blob, nic_count=len(self.st.nics)), feed)

    def accept_batch(self, batch: wire.Batch, feed: bool = True) -> dict[str, Any]:
        """Cache a batch's frames for the VM and feed what fits (unless not
        ``feed``: a VM known not to read); the batch was decoded for this
        session (``nic_count=len(self.st.nics)``)."""
        self.mark_stop()
        if self.metrics is not None:
            self.metrics.batch(len(batch), int(batch.offsets[-1] - batch.offsets[0]) - sum(batch.hdr_lens))
        if batch.seq != self.st.next_seq:
            raise SessionError("bad_batch", f"batch {batch.seq} out of sequence (expected {self.st.next_seq})")
        self.st.next_seq += 1
        self.st.batches += 1
        skipped: list[int]
        if self._accept_whole(batch):
            accepted, dropped, skipped = len(batch), 0, []
        else:
            accepted, dropped, skipped = self._accept_frames(batch)
        if feed:
            self.feed()
        return {"seq": batch.seq, "accepted": accepted, "dropped": dropped, "skipped": skipped}

    def _accept_frames(self, batch: wire.Batch) -> tuple[int, int, list[int]]:
        """A batch frame by frame: each checked, suppressed if the network
        delivered it here already, kept within the cache's cap.  What was
        accepted, dropped, and the indexes not replayed."""
        accepted = dropped = 0
        skipped: list[int] = []  # indexes in the batch not replayed
        zero_hdr = bytes(wire.VNET_HDR_LEN)
        keep: dict[int, list[bytes | memoryview]] = {}
        rec: bytes | memoryview
        for i, (nic, h, rec) in enumerate(zip(batch.nics, batch.hdr_lens, batch.records, strict=True)):
            dn = self.st.nics[nic]
            data = rec[h:] if h else rec
            dst = wire.dst_mac(data)
            foreign, own = dst != dn.mac_bytes and not wire.is_group(dst), data[6:12] == dn.mac_bytes
            if foreign or own:
                dn.drop("foreign_mac" if foreign else "own_frame")
                dropped += 1
                skipped.append(i)
                continue
            if not i % 32:
                # Often, not only per batch: a flooded copy can reach the
                # destination while the batch is being handled.
                self.pull_direct(dn)
                self.pull_mirror(dn)
            if dn.direct:
                # (a view of a received message hashes only as bytes)
                key = hash(data if isinstance(data, bytes) else bytes(data))
                if dn.direct.get(key):
                    dn.direct[key] -= 1
                    dn.duplicates += 1
                    skipped.append(i)
                    continue
            if dn.live_at_stop is not None and dn.live_enqueued > dn.live_at_stop and wire.is_group(dst):
                dn.late_group += 1  # goes in behind live frames (feed counts it reordered)
            if not h:
                rec = zero_hdr + rec  # the TX ring takes a virtio-net header with each frame
            # (A copied record costs its bytes and its 4-byte offset; each
            # NIC's chunk 4 more, counted below.)
            if self.st.cache_bytes + len(rec) + 8 > self.st.cfg.max_cache_bytes:
                dn.drop("agent_cache_full")
                dropped += 1
                skipped.append(i)
                continue
            keep.setdefault(nic, []).append(rec)
            self.st.cache_bytes += len(rec) + 4
            accepted += 1
        for nic, recs in keep.items():
            self.st.cache_bytes += self.st.nics[nic].pending.add(recs) - sum(map(len, recs)) - 4 * len(recs)
        return accepted, dropped, skipped

    def _accept_whole(self, batch: wire.Batch) -> bool:
        """The usual batch in one go: every record for one NIC, with its
        virtio-net header, to the VM's own MAC and not from it, none that a
        frame delivered here directly could duplicate, and room in the
        cache.  The cache then keeps the received body itself (no copy).
        False when anything is unusual: the per-frame path decides."""
        n = len(batch)
        if not n or batch.nics.count(batch.nics[0]) != n or \
                batch.hdr_lens.count(wire.VNET_HDR_LEN) != n:
            return False
        dn = self.st.nics[batch.nics[0]]
        self.pull_direct(dn)
        self.pull_mirror(dn)
        # Frames delivered here directly can only duplicate records with the
        # same destination: group frames among them never match these.
        if dn.direct_unicast:
            return False
        # What keeping the body costs: all of the buffer, not only its records.
        size = retained(batch.body) + 4 * len(batch.offsets)
        if self.st.cache_bytes + size > self.st.cfg.max_cache_bytes:
            return False
        if len(dn.mac_bytes) != 6:
            return False
        mac = np.frombuffer(dn.mac_bytes, np.uint8)
        macs = batch.column(wire.VNET_HDR_LEN, 12)  # each frame's destination and source
        if not (macs[:, :6] == mac).all() or (macs[:, 6:] == mac).all(axis=1).any():
            return False
        self.st.cache_bytes += dn.pending.add_span(batch.body, batch.offsets)
        return True


def _close_counter(dn: DestNic) -> None:
    if dn.tx_counter is not None:
        dn.tx_counter.close()
        dn.tx_counter = None
