"""``netpass migrate``: the source side of a zero-loss migration.

1. **Arm.** Authenticate to the destination agent, find the VM's NICs and
   taps, take QEMU's tap fds (pidfd_getfd), open a shadow socket on each
   tap, and have the agent arm the destination.  Any failure
   here aborts before the migration starts (or, with ``best_effort``,
   migrates without netpass and says so).
2. **Migrate.** QEMU keeps its own convergence logic and decides the
   switchover; netpass changes none of its parameters.
3. **At the stop** (QMP ``STOP``): pin each VM MAC to its tap on the source
   bridge (sticky FDB), so frames keep coming to us while the network
   converges.  Then settle the frames QEMU's tap backend read at the stop and
   never delivered (see ``_settle``); netpass ships them first, from the
   shadow.
4. **Capture and ship.** Drain QEMU's tap rings through our duplicate fds and
   stream zstd batches to the agent as frames come.
5. **Linger** until a quiet period after the destination resumes, once the
   destination reports the network delivering there (bounded),
   also after the source QEMU exits: our fd keeps its tap alive.
6. **Undo** every kernel change on every exit path.  If the migration fails
   after the stop, the captured frames go back into the source taps (QEMU
   delivers the one it kept itself): nothing is lost either way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import operator
import os
import time
import uuid
from pathlib import Path
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import links, pcap, procs, tapfd, wire
from .channel import BATCH, CONTROL, AuthError, Channel, ChannelError, connect
from .errors import KernelError, MigrationFailed, NetpassError, QMPError
from .migration import progress_line
from .nics import Nic, discover, last_rx_buffer, rx_filter, rx_state, rx_used, virtio_paths
from .packet import Injector, Shadow
from .qmp import Event, Monitor, peer_pid
from .session import State, StateMachine

log = logging.getLogger(__name__)

_SRC_MAC = operator.itemgetter(slice(6, 12))
_ENTRY_DATA = operator.itemgetter(2)  # a shadow entry: (index, vnet, data)
# Memory a cached frame takes besides its own bytes: the Frame tuple, its
# virtio-net header, the bytes object's header, its timestamp and the slots
# in the cache and the send queue.  Measured 225 bytes per 64-byte frame on
# CPython 3.11 (RSS over 2,097,152 frames); counted against --max-cache-bytes,
# so that the cap bounds memory, not only frame bytes (4.5x at 64 B without).
CACHE_FRAME_OVERHEAD = 256
MIN_SAMPLE_AGREEMENT = 0.75  # of the delivery samples, for the accounting to decide (qemu_losses)
ALIGN_SCAN = 65_536  # shadow entries searched for a drained frame (the shadow keeps this many)

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class MigrateOptions:
    qmp: str
    uri: str
    dest_agent: str
    dest_qmp: str
    token: bytes
    best_effort: bool = False
    max_cache_bytes: int = 256 << 20
    linger_quiet_ms: int = 300
    linger_max_ms: int = 5000
    batch_frames: int = 512
    batch_interval_ms: float = 2.0
    timeout_s: float = 900.0
    tls_ca: str | None = None
    # Every 3 ms coincided with destination guest crashes in the lab (see
    # README); every 50 ms did not, and still pins the accounting.
    sample_interval_ms: float = 50.0
    strict_ordering: bool = False
    hold_timeout_ms: int = 3000
    save_pcap: str | None = None
    compress: str = "auto"


@dataclass
class SourceNic:
    index: int
    nic: Nic
    fds: list[int]
    hdr_size: int
    shadow: Any = None
    virtio_path: str | None = None
    # (tx_packets before, RX used index, RX queues without a known buffer,
    #  tx_packets after, when): see SourceSession._sampler
    samples: list[tuple[int, int, int, int, float]] = field(default_factory=list)
    lost_by_qemu: int = 0
    settle: dict[str, Any] = field(default_factory=dict)
    bridge: str | None = None
    pinned: bool = False
    swallow_pending: bool = False
    own_frames: int = 0
    mac_bytes: bytes = b""
    swallowed_recovered: int = 0
    sacrifice: bytes = b""
    captured: int = 0
    bytes_captured: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tx_dropped0: int = 0  # the tap's drop counter at arm time
    expect: int | None = None  # shadow index of the next frame the drain should read
    dropped_at_stop: int = 0  # the tap's tx_dropped just before the stop
    drop_samples: list[tuple[float, int]] = field(default_factory=list)
    shadow_dropped_at_stop: int = 0
    shadow_dropped_final: int = 0
    overflow_recovered: int = 0  # frames the tap's ring dropped, taken from the shadow
    sacrifice_dropped: int = 0  # 1 when the ring dropped the sacrificial frame (tun counts it)
    ring_overflow: int | None = None  # frames the tap's ring dropped before netpass drained them


class SourceSession:
    def __init__(self, opts: MigrateOptions, progress: Progress | None = None) -> None:
        self.o = opts
        self.sid = uuid.uuid4().hex[:12]
        self.sm = StateMachine(self.sid)
        self.progress = progress or (lambda kind, data: None)
        self.ch: Channel | None = None
        self.mon: Monitor | None = None
        self.nics: list[SourceNic] = []
        self.set_events_cap = False
        self.external_pause = False
        self.was_running = True
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.unacked: dict[int, list[wire.Frame]] = {}
        self.pcap_frames: list[wire.Frame] = []
        self.pcap_written: int | None = None
        self.outq: deque[wire.Frame] = deque()
        self.cache: list[wire.Frame] = []
        self.cache_bytes = 0
        self.seq = 0
        self.batches_compressed = 0
        self.drain_start_ms: float | None = None
        self.shipped = 0
        self.agent_accepted = 0
        self.agent_dropped = 0
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.channel_error: NetpassError | None = None
        self.last_frame_t = 0.0
        self.stop_t: float | None = None
        self.completed = False
        self.migration_info: dict[str, Any] = {}
        self.dest_report: dict[str, Any] = {}
        self.dest_status: str | None = None
        self.resumed_t: float | None = None
        self.returned_to_source = 0
        self.giveback_counts: dict[str, int] = {}
        self.stop_emitted: float | None = None
        self.recovered: list[wire.Frame] = []
        self.readers: list[int] = []
        self.notes: list[str] = []
        self.netpass_active = True
        self.src_pid: int | None = None
        self.direct_seen = False

    # -- helpers --------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        log.info("session=%s %s", self.sid, msg)
        self.progress("info", {"message": msg})

    @staticmethod
    def _drop(sn: SourceNic, reason: str, n: int = 1) -> None:
        sn.dropped[reason] = sn.dropped.get(reason, 0) + n

    # -- arm ------------------------------------------------------------------------------
    async def _open_agent(self) -> None:
        self.ch = await connect(self.o.dest_agent, self.o.token, self.o.tls_ca)

    async def arm(self) -> None:
        await self._open_agent()  # auth first: nothing happens for a wrong token
        pid = peer_pid(self.o.qmp)
        self.src_pid = pid
        self.mon = Monitor(self.o.qmp, "src")
        await self.mon.connect()
        status = await self.mon.status()
        if status not in ("running", "paused"):
            raise MigrationFailed(f"the source VM is '{status}': it must be running or paused to migrate")
        self.was_running = status == "running"
        mig = await self.mon.execute("query-migrate")
        if mig.get("status") in ("active", "setup", "pre-switchover", "device"):
            raise MigrationFailed("a migration of this VM is already in progress")
        found = await discover(self.mon, pid)
        assert self.ch is not None
        await self.ch.send_json(CONTROL, {"op": "open", "session": self.sid, "dest_qmp": self.o.dest_qmp,
                                          "macs": [n.mac for n in found], "resume": self.was_running,
                                          **({"strict": {"hold_timeout_ms": self.o.hold_timeout_ms}}
                                             if self.o.strict_ordering else {})})
        armed = await self.ch.recv_json(CONTROL, timeout=60)
        if armed.get("op") != "armed":
            raise ChannelError(f"agent answered {armed.get('op')!r} to 'open'")
        paths = await virtio_paths(self.mon)
        pidfd = tapfd.pidfd_open(pid)
        try:
            for i, nic in enumerate(found):
                fds = [tapfd.pidfd_getfd(pidfd, fd) for fd in nic.qemu_fds]
                sn = SourceNic(index=i, nic=nic, fds=fds, hdr_size=tapfd.vnet_hdr_size(fds[0]),
                               mac_bytes=bytes.fromhex(nic.mac.replace(":", "")))
                self.nics.append(sn)
                for fd in fds:
                    if not tapfd.is_nonblocking(fd):
                        raise MigrationFailed(f"QEMU's fd for tap {nic.tap} is blocking; netpass "
                                              "cannot read it safely")
                info = links.info(None, nic.tap)
                sn.tx_dropped0 = info.tx_dropped
                if info.master:
                    sn.bridge = links.name_of(None, info.master)
                # The ring size is left alone: changing txqueuelen deactivates a
                # live device for a moment and drops frames (measured).  netpass
                # drains the ring continuously from the stop instead.
                sn.virtio_path = paths.get(nic.mac)
                sn.shadow = Shadow(nic.tap, keep=ALIGN_SCAN)
                sn.sacrifice = self._sacrificial_frame(nic.mac)
        finally:
            os.close(pidfd)
        loop = asyncio.get_running_loop()
        for sn in self.nics:
            loop.add_reader(sn.shadow.fileno(), sn.shadow.pull)
        self.sm.to(State.ARMED)
        self._say(f"armed: {len(self.nics)} NIC(s) " +
                  ", ".join(f"{n.nic.mac} on {n.nic.tap} ({len(n.fds)} queue(s))" for n in self.nics))

    def _sacrificial_frame(self, mac: str) -> bytes:
        """A frame the guest drops: to its MAC, from a locally administered
        MAC, with the IEEE 802 local experimental EtherType."""
        src = bytes.fromhex("026e70" + self.sid[:6])
        body = b"netpass sacrificial frame " + self.sid.encode()
        return bytes.fromhex(mac.replace(":", "")) + src + b"\x88\xb5" + body.ljust(46, b"\0")

    # -- capture --------------------------------------------------------------------------
    def _on_readable(self, sn: SourceNic, fd: int, hdr: int) -> None:
        self._take(sn, tapfd.drain(fd, 256), hdr)

    def _take(self, sn: SourceNic, bufs: list[bytes], hdr: int) -> None:
        """Capture a round of tap reads (each ``hdr`` bytes of virtio-net
        header, then the frame), in order."""
        if bufs and self._capture_round(sn, bufs, hdr):
            return
        for buf in bufs:
            data = buf[hdr:]
            if data == sn.sacrifice:
                if sn.swallow_pending:
                    # Nothing real was ahead of it: QEMU's reads end just before it.
                    sn.shadow.pull()
                    self._account(sn, sn.shadow.index_of(data, sn.settle["inject_seen"]))
                    sn.swallow_pending = False
                if sn.expect is not None:
                    self._align(sn, data)  # past it in the shadow; never captured
                continue
            if sn.swallow_pending:
                sn.shadow.pull()
                start = max(0, sn.settle["inject_seen"] - 4096)
                self._account(sn, sn.shadow.index_of(data, start))
                sn.swallow_pending = False
            if sn.expect is not None:
                self._align(sn, data)
            self._capture(sn, buf[:wire.VNET_HDR_LEN] if hdr else b"", data)

    def _capture_round(self, sn: SourceNic, bufs: list[bytes], hdr: int) -> bool:
        """The usual round of reads in one go: no sacrificial frame and no
        swallowed one to look for, no runt, none of the VM's own, room in
        the cache, and (after the stop) the shadow's next entries are these
        very frames, in order: nothing dropped in between.  Same outcome as
        the per-frame path, with the per-frame work in C (map, islice);
        False, and nothing done, when anything is unusual."""
        if sn.swallow_pending:
            return False
        datas = list(map(operator.itemgetter(slice(hdr, None)), bufs)) if hdr else bufs
        sizes = list(map(len, datas))
        total = sum(sizes)
        cost = total + CACHE_FRAME_OVERHEAD * len(datas)
        if min(sizes) < wire.MIN_FRAME or sn.sacrifice in datas or \
                self.cache_bytes + cost > self.o.max_cache_bytes or \
                sn.mac_bytes in map(_SRC_MAC, datas):
            return False
        k = len(datas)
        if sn.expect is not None:
            shadow = sn.shadow
            frames = shadow.frames
            _forget_before(frames, sn.expect)
            if len(frames) < k:
                shadow.pull()
            if len(frames) < k or frames[0][0] != sn.expect or \
                    shadow.dropped > sn.shadow_dropped_at_stop:
                return False
            head = list(itertools.islice(frames, k))
            if head[-1][0] != sn.expect + k - 1 or \
                    not all(map(operator.eq, map(_ENTRY_DATA, head), datas)):
                return False  # a gap (the ring dropped some): the per-frame path finds it
            for _ in range(k):
                frames.popleft()
            sn.expect += k
        now = time.monotonic()
        ts = int((now - self.t0) * 1e6)
        vnets = map(operator.itemgetter(slice(0, wire.VNET_HDR_LEN)), bufs) if hdr else itertools.repeat(b"")
        # tuple.__new__ builds each Frame in C (a NamedTuple's own __new__ is Python)
        batch = list(map(tuple.__new__, itertools.repeat(wire.Frame),
                         zip(itertools.repeat(sn.index), vnets, datas, itertools.repeat(ts))))
        self.last_frame_t = now
        sn.captured += k
        sn.bytes_captured += total
        self.cache += batch
        self.cache_bytes += cost
        self.outq += batch
        return True

    def _align(self, sn: SourceNic, data: bytes) -> None:
        """Catch the frames the tap's ring dropped, in their place.

        The shadow sees every frame the host sends toward the tap, before tun
        queues it, so also those tun drops because the ring is full (while
        QEMU is stopped and before the drain caught up: at 40,000 frames/s
        the 1000-frame ring of a default tap lasts 25 ms).  After the stop
        only netpass reads the ring, oldest first, so the frames it reads are
        the shadow's in order, less the dropped ones: the shadow entries
        skipped before the frame just read.  They are captured before it, so
        order is kept.
        """
        frames = sn.shadow.frames
        expect = sn.expect
        assert expect is not None
        j = _position(frames, expect, data)
        if j is None:
            sn.shadow.pull()  # the frame entered after the last pull
            j = _position(frames, expect, data)
        if j is None or frames[0][0] != expect or sn.shadow.dropped > sn.shadow_dropped_at_stop:
            sn.expect = None
            self.notes.append(f"{sn.nic.tap}: lost track of the ring in the shadow (the shadow "
                              f"socket dropped {sn.shadow.dropped - sn.shadow_dropped_at_stop} copies); "
                              "frames the ring drops from here on are not recovered "
                              "(tap_ring_overflow counts them)")
            return
        skipped = [f for f in (frames.popleft() for _ in range(j)) if f[2] != sn.sacrifice]
        if len(skipped) < j:
            sn.sacrifice_dropped = 1  # a full ring dropped it: never captured, but tun counted it
        if skipped:
            # Only as many as tun counts as dropped since the stop: a frame
            # someone else read (QEMU, resumed after a cancel) is a gap too,
            # and must not be delivered twice.  Those are the oldest.
            try:
                budget = (links.tx_dropped(sn.nic.tap) - sn.dropped_at_stop - sn.overflow_recovered
                          - sn.sacrifice_dropped)
            except NetpassError:
                budget = 0
            for _idx, vnet, dropped in skipped[max(0, len(skipped) - max(0, budget)):]:
                sn.overflow_recovered += 1
                self._capture(sn, vnet, dropped)
        sn.expect = frames.popleft()[0] + 1

    def _recover(self, sn: SourceNic, items: list[tuple[bytes, bytes]] | None) -> None:
        """Ship, from the shadow, the frames QEMU read at the stop and never delivered."""
        if items is None or len(items) < sn.lost_by_qemu:
            found = len(items or [])
            self._drop(sn, "lost_in_qemu_unidentified", sn.lost_by_qemu - found)
            self.notes.append(f"QEMU lost {sn.lost_by_qemu} frame(s) of {sn.nic.mac} at the stop; "
                              f"the shadow identified {found}")
        items = items or []
        for vnet, data in items:
            log.info("session=%s %s: recovering a frame QEMU read at the stop: %s", self.sid, sn.nic.tap,
                     data[:64].hex())
        for i, (vnet, data) in enumerate(items):
            sn.swallowed_recovered += 1
            self._capture(sn, vnet, data)
            kept = i == len(items) - 1 and not sn.settle.get("taken", True)
            if kept and self.cache and self.cache[-1].data is data:
                # QEMU still holds this one and delivers it itself if the VM
                # resumes here; the one it purged while stopping it does not.
                self.recovered.append(self.cache[-1])

    def _capture(self, sn: SourceNic, vnet: bytes, data: bytes) -> None:
        now = time.monotonic()
        if len(data) < wire.MIN_FRAME:
            self._drop(sn, "runt")
            return
        if data[6:12] == sn.mac_bytes:
            # The VM's own transmissions (its announcements from the
            # destination, flooded back to us): never give a VM its own frames.
            sn.own_frames += 1
            return
        self.last_frame_t = now
        if self.cache_bytes + len(data) + CACHE_FRAME_OVERHEAD > self.o.max_cache_bytes:
            self._drop(sn, "cache_full")
            return
        f = wire.Frame(sn.index, vnet, data, int((now - self.t0) * 1e6))
        sn.captured += 1
        sn.bytes_captured += len(data)
        self.cache.append(f)
        self.cache_bytes += len(data) + CACHE_FRAME_OVERHEAD
        self.outq.append(f)

    def start_draining(self) -> None:
        loop = asyncio.get_running_loop()
        for sn in self.nics:
            for fd in sn.fds:
                self._on_readable(sn, fd, sn.hdr_size)
                loop.add_reader(fd, self._on_readable, sn, fd, sn.hdr_size)
                self.readers.append(fd)

    def stop_draining(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self.readers:
            loop.remove_reader(fd)
        self.readers.clear()
        self._read_overflow()

    def _read_overflow(self) -> None:
        """Frames each tap's ring dropped since arm time: not drained in time
        (tun counts them as the tap's tx_dropped).  Read once capture ends."""
        for sn in self.nics:
            if sn.ring_overflow is None and sn.fds:
                try:  # (the tap is gone with a killed QEMU: then unknown)
                    sn.ring_overflow = links.tx_dropped(sn.nic.tap) - sn.tx_dropped0
                except NetpassError:
                    pass

    def drain_now(self) -> None:
        for sn in self.nics:
            for fd in sn.fds:
                self._on_readable(sn, fd, sn.hdr_size)

    # -- ship -----------------------------------------------------------------------------
    async def ship_pending(self) -> None:
        assert self.ch is not None
        while self.outq:
            n = min(len(self.outq), self.o.batch_frames)
            if n == len(self.outq):
                frames = list(self.outq)
                self.outq.clear()
            else:
                frames = [self.outq.popleft() for _ in range(n)]
            raw = wire.wire_size(frames)
            zstd = self.ch.should_compress(self.o.compress, raw)
            t = time.perf_counter()
            blob = wire.encode(self.seq, frames, compress=zstd)
            if zstd:
                self.ch.compressed(raw, len(blob), time.perf_counter() - t)
                self.batches_compressed += 1
            if self.o.save_pcap:
                self.unacked[self.seq] = frames
            self.seq += 1
            await self.ch.send(BATCH, blob)
            self.shipped += n

    async def _shipper(self) -> None:
        while True:
            try:
                await self.ship_pending()
            except ChannelError as exc:
                self.channel_error = exc
                return
            await asyncio.sleep(self.o.batch_interval_ms / 1000)

    async def _receiver(self) -> None:
        assert self.ch is not None
        while True:
            try:
                mtype, payload = await self.ch.recv()
            except ChannelError as exc:
                self.channel_error = exc
                await self.replies.put({"op": "error", "message": str(exc)})
                return
            msg = json.loads(payload)
            if msg.get("op") == "direct":
                self.direct_seen = True
                continue
            if msg.get("op") == "ack":
                self.agent_accepted += int(msg.get("accepted", 0))
                self.agent_dropped += int(msg.get("dropped", 0))
                sent = self.unacked.pop(int(msg.get("seq", -1)), None)
                if sent is not None:
                    skipped = set(msg.get("skipped") or ())
                    self.pcap_frames += [f for i, f in enumerate(sent) if i not in skipped]
            else:
                await self.replies.put(msg)

    async def _reply(self, op: str, timeout: float) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(self.replies.get(), timeout)
        except asyncio.TimeoutError as exc:
            raise ChannelError(f"the agent did not answer '{op}' within {timeout:.0f} s") from exc
        if msg.get("op") == "error":
            raise ChannelError(str(msg.get("message")))
        return msg

    # -- the migration --------------------------------------------------------------------
    async def _configure_qemu(self) -> None:
        assert self.mon is not None
        caps = {c["capability"]: c["state"] for c in await self.mon.execute("query-migrate-capabilities")}
        self.external_pause = bool(caps.get("pause-before-switchover"))
        if self.external_pause:
            self._say("pause-before-switchover is already on: a management layer owns it; "
                      "netpass will wait for it to continue")
        if not caps.get("events"):
            await self.mon.execute("migrate-set-capabilities",
                                   {"capabilities": [{"capability": "events", "state": True}]})
            self.set_events_cap = True

    async def _restore_qemu(self) -> None:
        if self.mon is None:
            return
        try:
            if self.set_events_cap:
                await self.mon.execute("migrate-set-capabilities",
                                       {"capabilities": [{"capability": "events", "state": False}]}, timeout=2)
        except QMPError:
            pass  # the source QEMU may be gone (killed at completion): nothing to restore

    async def _begin_capture(self) -> None:
        """The VM is stopped: pin MACs, settle the swallowed frame, drain."""
        if self.stop_t is not None:
            return
        self.stop_t = time.monotonic()
        if self.o.strict_ordering and self.ch is not None:
            # First: the destination starts holding its VM's traffic.
            await self.ch.send_json(CONTROL, {"op": "stopped"})
        for sn in self.nics:
            if sn.bridge:
                try:
                    links.pin_mac(None, sn.nic.tap, sn.nic.mac)
                    sn.pinned = True
                except NetpassError as exc:
                    self.notes.append(f"could not pin {sn.nic.mac} on {sn.bridge}: {exc}")
        for sn in self.nics:
            t = time.monotonic()
            await self._settle(sn)
            log.info("session=%s %s settled in %.1f ms", self.sid, sn.nic.tap, (time.monotonic() - t) * 1000)
        self.start_draining()
        self.drain_start_ms = round((time.monotonic() - self.stop_t) * 1000, 1)
        self.sm.to(State.CAPTURING)
        self.sm.to(State.SHIPPING)

    async def _sampler(self) -> None:
        """Sample QEMU's reads and deliveries while the VM runs.

        tx_packets counts QEMU's reads from the tap; the RX used index counts
        what the device handed to the guest.  One sample is (tx_packets before,
        used index, tx_packets after) around a QMP query: the reads at the
        moment QEMU answered lie between the two tx_packets values.  Many
        samples pin down how the two counters line up (see _account).
        """
        assert self.mon is not None
        nics = [sn for sn in self.nics if sn.virtio_path is not None]
        while self.stop_t is None:
            now = time.monotonic()
            for sn in self.nics:
                # The ring's drop counter while the VM runs: the baseline for
                # the drops after the stop that _align may recover.
                sn.drop_samples.append((now, links.tx_dropped(sn.nic.tap)))
                del sn.drop_samples[:-64]
            for sn in nics:
                # The shadow's socket buffer holds a few thousand frames: kept
                # in the shadow instead, every sample stays usable (_account).
                sn.shadow.pull()
                before = links.tx_packets(sn.nic.tap)
                try:
                    used, starved = await rx_state(self.mon, sn.virtio_path, len(sn.fds))  # type: ignore[arg-type]
                except QMPError:
                    return
                after = links.tx_packets(sn.nic.tap)
                sn.samples.append((before, used, starved, after, time.monotonic()))
                del sn.samples[:-2048]
            await asyncio.sleep(self.o.sample_interval_ms / 1000)

    async def _settle(self, sn: SourceNic) -> None:
        """Let QEMU's tap reader make its last read, then find the frames it
        read but never delivered.

        After the stop, QEMU's tap backend reads one frame it cannot deliver
        and keeps it; a frame it read in the moment the VM was stopping (or
        one it held for want of a guest buffer) is dropped when the stop
        purges its queues (DESIGN §2, and QEMU's net_vm_change_state_handler).
        When that read happens is up to QEMU's main loop, which a loaded host
        may not run for a while: netpass must not start draining the ring
        before it, or QEMU takes a frame from the middle of the drain.  So:

        * a sacrificial frame goes into the ring through the tap's qdisc (the
          shadow sees it in its place), so the ring is not empty;
        * two QMP commands are answered: QEMU's main loop answers each in an
          iteration that also dispatches the tap's reader, if armed, since
          the ring is readable; after the second, QEMU's reads are over;
        * QEMU's reads (tx_packets) are then final, and the frames they were
          come from the shadow: they end just before the first frame still
          in the ring (the sacrificial one, a real one before it, or, with
          the ring empty, the one after the sacrificial frame);
        * how many of them the device handed to the guest comes from the RX
          used index; the NIC's receive filter says which it would take.

        The accepted frames read but not delivered are the ones lost inside
        QEMU, and the shadow holds their bytes.
        """
        assert self.mon is not None
        sn.shadow.pull()
        inject_seen = sn.shadow.seen
        # Drops from the stop on may be recovered; the STOP event comes late
        # (the ring may overflow before it), so the baseline is the last
        # sample taken well before the stop, else the count at arm time.
        cutoff = (self.stop_emitted or time.monotonic()) - 0.02
        before = [d for t, d in sn.drop_samples if t < cutoff]
        sn.dropped_at_stop = before[-1] if before else sn.tx_dropped0
        sn.shadow_dropped_at_stop = sn.shadow.dropped
        inj = Injector(sn.nic.tap, bypass=False)
        try:
            if not inj.send(bytes(wire.VNET_HDR_LEN), sn.sacrifice):
                self.notes.append(f"{sn.nic.tap}: the tap's queue was full at the stop; the sacrificial "
                                  "frame could not be queued")
        finally:
            inj.close()
        t_inj = time.monotonic()
        sn.settle = {"inject_seen": inject_seen}
        if sn.virtio_path is not None:
            try:
                sn.settle["used"] = (await rx_state(self.mon, sn.virtio_path, len(sn.fds)))[0]
            except QMPError as exc:
                log.warning("session=%s cannot read the RX used index: %s", self.sid, exc)
        sn.settle["filter"] = await rx_filter(self.mon, sn.nic.name)
        if sn.virtio_path is None or "used" not in sn.settle:
            await self.mon.execute("query-status")  # the barrier's second command
        sn.settle["tx"] = links.tx_packets(sn.nic.tap)
        if sn.virtio_path is not None and len(sn.fds) == 1:
            # What the guest got last, from its memory: breaks a tie the
            # samples leave (_account).
            try:
                sn.settle["last_rx"] = await last_rx_buffer(self.mon, sn.virtio_path)
            except QMPError as exc:
                log.info("session=%s cannot read the guest's last RX buffer: %s", self.sid, exc)
        sn.shadow.pull()
        sac = sn.shadow.index_of(sn.sacrifice, inject_seen)
        empty = not tapfd.readable(sn.fds)
        log.info("session=%s %s: QEMU's last read is over after %.1f ms; %d frames entered since the "
                 "stop was seen; the ring is %s", self.sid, sn.nic.tap, (time.monotonic() - t_inj) * 1000,
                 sn.shadow.seen - inject_seen, "empty" if empty else "not empty")
        if empty:
            # QEMU read everything, the sacrificial frame last.
            self._account(sn, None if sac is None else sac + 1)
        else:
            sn.swallow_pending = True  # the first frame drained tells (_take)

    def _account(self, sn: SourceNic, read_end: int | None) -> None:
        """Work out and recover the frames QEMU lost; ``read_end`` is the
        shadow index of the first frame QEMU did not read.

        Reads are FIFO over the shadow (the sacrificial frame is in it too),
        so the read numbered t (tx_packets) is shadow frame t - c, and c is
        known now: QEMU's last read was the frame before ``read_end``.
        While the VM runs, the used index equals (accepted frames read so
        far) + C - q for one constant C, where q is 1 while QEMU holds a
        frame for want of a guest buffer, else 0.  Each sample bounds C;
        together they pin it (see qemu_losses).  Then the accepted frames
        QEMU read, less those delivered, are the ones lost inside QEMU.
        """
        sn.expect = read_end  # from here on only netpass reads the ring (see _align)
        st = sn.settle
        # QEMU's last read is the one it keeps: the sacrificial frame, or a
        # real one before it (then the sacrificial frame is still queued).
        last = sn.shadow.span(read_end - 1, read_end) if read_end else None
        taken = bool(last) and last[0][1] == sn.sacrifice
        st["taken"] = taken
        recovered: list[tuple[bytes, bytes]] | None = None
        why = ""
        flt = st.get("filter")
        if not sn.samples or "used" not in st or flt is None:
            why = ("no delivery accounting (needs x-query-virtio-queue-status and query-rx-filter"
                   f", {len(sn.samples)} samples)")
        elif read_end is None:
            why = "the first frame left in the ring is not in the shadow"
        else:
            c = st["tx"] - read_end
            base = sn.shadow.frames[0][0] if sn.shadow.frames else read_end
            span = sn.shadow.span(base, read_end) or []
            takes = [data != sn.sacrifice and flt.accepts(data) for _vnet, data in span]
            accepted = list(itertools.compress(span, takes))
            acc = list(itertools.accumulate(takes, initial=0))
            # Samples answered after the VM began to stop are not valid: the STOP
            # event comes after the stop, by up to a few milliseconds here.
            cutoff = (self.stop_emitted or time.monotonic()) - 0.02
            bounds = []
            for tb, used, starved, ta, at in sn.samples:
                s_lo, s_hi = tb - c - base, ta - c - base
                if at <= cutoff and s_lo >= 0 and s_hi <= len(span):  # (else beyond the shadow)
                    bounds.append((acc[s_lo], acc[s_hi], used, starved))
            wrap = 1 << 16 if len(sn.fds) == 1 else None
            found = qemu_losses(bounds, acc[-1], st["used"], wrap)
            # QEMU loses at most two: one it held as the VM stopped, purged,
            # and the one it read after and keeps: a real frame, unless it
            # was the sacrificial one.
            structural = {0, 1} if taken else {1, 2}
            if found is None or found[3]:
                log.info("session=%s %s: the delivery samples disagree; per sample, C within: %s",
                         self.sid, sn.nic.tap, [(u - hi_, u - lo_ + q) for lo_, hi_, u, q in bounds])
            if found is None:
                why = f"delivery accounting inconsistent ({len(bounds)} usable samples)"
            else:
                results, lo, hi, odd = found
                log.info("session=%s %s: %d samples (%d disagree), offset in [%d, %d]: lost inside QEMU %s, "
                         "possible %s; QEMU kept %s", self.sid, sn.nic.tap, len(bounds), odd, lo, hi,
                         sorted(results), sorted(structural),
                         "the sacrificial frame" if taken else "a real frame")
                if wrap is None and lo != hi:
                    why = f"delivery accounting ambiguous by {hi - lo}"
                else:
                    results &= structural
                    results = self._by_last_buffer(sn, results, accepted)
                    if len(results) == 1:
                        lost = results.pop()
                        recovered = accepted[len(accepted) - lost:] if lost else []
                    else:
                        why = f"delivery accounting gave {sorted(results)}"
        if recovered is None:
            # Without accounting: QEMU's last read, unless it was the
            # sacrificial frame, is the frame it kept; a purged one goes unnoticed.
            recovered = []
            if not taken and read_end is not None:
                recovered = sn.shadow.span(read_end - 1, read_end) or []
            self.notes.append(f"{sn.nic.tap}: {why}; recovered {len(recovered)} frame QEMU kept, "
                              "one it dropped while stopping may go unnoticed")
        if len(sn.fds) > 1:
            self.notes.append(f"{sn.nic.tap} has {len(sn.fds)} queues: frames lost inside QEMU are "
                              "worked out for the whole device")
        sn.lost_by_qemu = len(recovered)
        self._recover(sn, recovered)

    def _by_last_buffer(self, sn: SourceNic, results: set[int], accepted: list[tuple[bytes, bytes]]) -> set[int]:
        """Of the possible losses, the one the guest's last filled RX buffer
        agrees with, when the samples leave more than one: with n lost, the
        last frame delivered is the n+1-th accepted one from the end.  Also
        says so in the log when the buffer contradicts a single answer."""
        last_rx = sn.settle.get("last_rx")
        if last_rx is None:
            return results
        told = {n for n in range(3) if _holds(last_rx, accepted, n)}
        if len(told) != 1:
            return results  # the buffer was reused, or the frames are alike
        if len(results) > 1 and told <= results:
            log.info("session=%s %s: the guest's last RX buffer holds the frame that leaves %d lost "
                     "(the samples allowed %s)", self.sid, sn.nic.tap, min(told), sorted(results))
            return told
        if results and told != results:
            log.warning("session=%s %s: the guest's last RX buffer says %d lost, the samples %s",
                        self.sid, sn.nic.tap, min(told), sorted(results))
        return results

    async def _migrate(self) -> None:
        assert self.mon is not None
        await self.mon.execute("migrate", {"uri": self.o.uri})
        try:
            await self._watch_migration()
        except QMPError:
            # A management layer may kill the source QEMU the moment it
            # completes, as libvirt does: success, if QEMU said so first.
            while (ev := await self.mon.next_event(0)) is not None:
                if ev.name == "MIGRATION" and ev.data.get("status") == "completed":
                    self.completed = True
                elif ev.name == "STOP" and self.stop_t is None and self.netpass_active:
                    self.stop_emitted = ev.emitted
                    await self._begin_capture()
            if not self.completed and self.stop_t is not None and self.src_pid is not None \
                    and not await asyncio.to_thread(procs.alive, self.src_pid, 1.0):
                # Killed at completion before its event reached us (a reset
                # connection drops what was unread): the destination decides.
                self.completed = True
                self.notes.append("the source QEMU exited after the stop before netpass read how the "
                                  "migration ended; the destination's state decides")
                self._say("the source QEMU exited after the stop: asking the destination")
                return
            if not self.completed:
                raise
            self._say("the source QEMU went away right after completing: that is success")
            return
        try:
            self.migration_info = await self.mon.execute("query-migrate")
            self.progress("migration", progress_line(self.migration_info))
        except QMPError:
            self._say("the source QEMU went away right after completing: that is success")

    async def _watch_migration(self) -> None:
        assert self.mon is not None
        deadline = time.monotonic() + self.o.timeout_s
        next_poll = 0.0
        while True:
            if time.monotonic() > deadline:
                raise MigrationFailed(f"the migration did not finish within {self.o.timeout_s:.0f} s")
            if self.channel_error is not None and self.netpass_active:
                raise self.channel_error
            ev: Event | None = await self.mon.next_event(0.02)
            if ev is not None:
                if ev.name == "STOP" and self.stop_t is None and self.netpass_active:
                    self.stop_emitted = ev.emitted
                    await self._begin_capture()
                if ev.name == "MIGRATION":
                    status = ev.data.get("status")
                    if status == "completed":
                        self.completed = True
                        return
                    if status in ("failed", "cancelled"):
                        info = await self.mon.execute("query-migrate")
                        raise MigrationFailed(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.05
                info = await self.mon.execute("query-migrate")
                self.progress("migration", progress_line(info))

    async def _linger(self) -> None:
        assert self.resumed_t is not None
        quiet = self.o.linger_quiet_ms / 1000
        hard = self.resumed_t + self.o.linger_max_ms / 1000
        while True:
            now = time.monotonic()
            if now >= hard:
                self.notes.append(f"linger bound of {self.o.linger_max_ms} ms reached")
                return
            # Quiet is not enough while frames came here after the resume and
            # the destination has not yet seen the network deliver there: a
            # pause in the traffic would end the linger while the network
            # still sends here (suspected in two failed late-LAN runs).
            converged = self.direct_seen or self.last_frame_t <= self.resumed_t
            if now - self.resumed_t >= quiet and now - self.last_frame_t >= quiet and converged:
                return
            await asyncio.sleep(0.01)

    async def _reads_and_deliveries(self) -> tuple[int, int] | None:
        sn = self.nics[0] if self.nics else None
        if sn is None or sn.virtio_path is None or self.mon is None or len(self.nics) != 1:
            return None
        try:
            return links.tx_packets(sn.nic.tap), await rx_used(self.mon, sn.virtio_path, len(sn.fds))
        except (QMPError, NetpassError):
            return None

    async def _until_consumed(self, bound_s: float = 2.0) -> None:
        """Wait until QEMU has read back everything we gave it (the rings are empty)."""
        deadline = time.monotonic() + bound_s
        while any(tapfd.readable(sn.fds) for sn in self.nics) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    async def _cancel_migration(self) -> None:
        """netpass failed while QEMU migrates: cancel, so the VM stays where it is."""
        if self.mon is None or self.completed:
            return
        try:
            info = await self.mon.execute("query-migrate", timeout=5)
            if info.get("status") in ("setup", "active", "pre-switchover", "device"):
                await self.mon.execute("migrate_cancel", timeout=5)
                for _ in range(200):
                    info = await self.mon.execute("query-migrate", timeout=5)
                    if info.get("status") not in ("setup", "active", "pre-switchover", "device", "cancelling"):
                        break
                    await asyncio.sleep(0.025)
            if info.get("status") == "completed":
                self.completed = True
        except QMPError as exc:
            log.warning("session=%s could not cancel the migration: %s", self.sid, exc)

    async def rollback(self) -> None:
        """The migration failed after the stop: give the frames back to the source VM.

        The frame QEMU kept at the stop is delivered by QEMU itself when the VM
        resumes, so its shadow copy is not given back twice; the one it purged
        while stopping is given back.
        """
        self._say("migration failed after the stop: returning the captured frames to the source VM")
        if self.ch is not None and self.channel_error is None:
            try:
                await self.ch.send_json(CONTROL, {"op": "abort", "reason": "migration failed"})
            except ChannelError:
                pass
        self.drain_now()
        self.stop_draining()
        before = await self._reads_and_deliveries()
        recovered = {id(f) for f in self.recovered}
        injectors = {sn.index: Injector(sn.nic.tap) for sn in self.nics}
        qlen = {sn.index: max(64, links.info(None, sn.nic.tap).txqueuelen) for sn in self.nics}
        fds = {sn.index: sn.fds for sn in self.nics}
        try:
            chunk: dict[int, int] = {i: 0 for i in injectors}
            for f in self.cache:
                if id(f) in recovered:
                    continue
                if chunk[f.nic] >= min(64, qlen[f.nic] // 2):
                    # Within the ring's room: let the resumed VM read first.
                    deadline = time.monotonic() + 2.0
                    while tapfd.readable(fds[f.nic]) and time.monotonic() < deadline:
                        await asyncio.sleep(0.0005)
                    chunk[f.nic] = 0
                full_since = None
                while not injectors[f.nic].send(f.vnet_hdr or bytes(wire.VNET_HDR_LEN), f.data):
                    full_since = full_since or time.monotonic()
                    if time.monotonic() - full_since > 2.0:
                        raise KernelError(f"tap {self.nics[f.nic].nic.tap} stayed full for 2 s: "
                                          "frames could not be given back")
                    await asyncio.sleep(0.001)  # a full ring: wait for QEMU to read
                chunk[f.nic] += 1
                self.returned_to_source += 1
        finally:
            for inj in injectors.values():
                inj.close()
        await self._until_consumed()
        after = await self._reads_and_deliveries()
        if before and after:
            # Everything QEMU read while we gave frames back (ours and live
            # ones) against what its NIC handed to the guest meanwhile.
            self.giveback_counts = {"reads": after[0] - before[0],
                                    "delivered": (after[1] - before[1]) % (1 << 16)}
        self.cache.clear()
        self.outq.clear()
        # QEMU resumes the source VM by itself when the migration fails.

    async def run(self) -> dict[str, Any]:
        shipper = receiver = sampler = None
        error: BaseException | None = None
        try:
            try:
                await self.arm()
            except AuthError:
                raise
            except NetpassError as exc:
                if not self.o.best_effort:
                    raise
                self._say(f"netpass could not arm ({exc}); --best-effort: migrating WITHOUT netpass")
                self.notes.append(f"best effort: migrated without netpass because: {exc}")
                self.netpass_active = False
                await self._teardown()
                if self.mon is None:
                    self.mon = Monitor(self.o.qmp, "src")
                    await self.mon.connect()
            if self.netpass_active:
                receiver = asyncio.create_task(self._receiver())
                shipper = asyncio.create_task(self._shipper())
                sampler = asyncio.create_task(self._sampler())
            await self._configure_qemu()
            try:
                await self._migrate()
            except (NetpassError, asyncio.CancelledError, KeyboardInterrupt) as exc:
                await self._cancel_migration()
                if self.stop_t is not None and not self.completed:
                    await self.rollback()
                if isinstance(exc, NetpassError):
                    raise MigrationFailed(f"{exc}; the VM stays on the source") from exc
                raise
            if not self.netpass_active:
                self.sm.to(State.DONE) if self.sm.state is State.ARMED else None
                return self.report()
            if self.stop_t is None:
                await self._begin_capture()
            # Everything captured so far goes before the 'migrated' notice.
            self.drain_now()
            await self.ship_pending()
            assert self.ch is not None
            await self.ch.send_json(CONTROL, {"op": "migrated", "resume": self.was_running})
            resumed = await self._reply("migrated", 90)
            self.resumed_t = time.monotonic()
            self.dest_status = str(resumed.get("status"))
            self.sm.to(State.REPLAYING)
            self._say(f"destination is {self.dest_status}; catching late frames")
            await self._linger()
            self.drain_now()
            self.stop_draining()
            await self.ship_pending()
            await self.ch.send_json(CONTROL, {"op": "end", "frames": self.shipped, "timeout": 10})
            self.dest_report = await self._reply("end", 30)
            self.sm.to(State.DONE)
            if self.dest_status != "running" and self.was_running:
                raise MigrationFailed(f"the destination VM is '{self.dest_status}', not running")
            self._write_pcap()
            return self.report()
        except BaseException as exc:
            error = exc
            self.sm.fail(str(exc) or type(exc).__name__)
            raise
        finally:
            for task in (shipper, receiver, sampler):
                if task is not None:
                    task.cancel()
                    try:
                        await task
                    except (asyncio.CancelledError, NetpassError):
                        pass
            await self._teardown()
            await self._restore_qemu()
            if self.mon is not None:
                await self.mon.close()
            if self.ch is not None:
                await self.ch.close()
            self._write_pcap()
            self.final_report = self.report(error)

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

    async def _teardown(self) -> None:
        """Undo every kernel change; safe to call more than once."""
        try:
            self.stop_draining()
        except RuntimeError:
            pass
        self._read_overflow()
        for sn in self.nics:
            if sn.shadow is not None:
                try:
                    asyncio.get_running_loop().remove_reader(sn.shadow.fileno())
                except (RuntimeError, ValueError):
                    pass
                sn.shadow_dropped_final = sn.shadow.dropped
                sn.shadow.close()
                sn.shadow = None
            if sn.pinned:
                try:
                    links.unpin_mac(None, sn.nic.tap, sn.nic.mac)
                except NetpassError as exc:
                    log.warning("session=%s unpin %s: %s", self.sid, sn.nic.mac, exc)
                sn.pinned = False
            for fd in sn.fds:
                os.close(fd)
            sn.fds = []

    def _after_resume(self) -> tuple[int, float | None]:
        if self.resumed_t is None:
            return 0, None
        cut = (self.resumed_t - self.t0) * 1e6
        late = [f.ts_us for f in self.cache if f.ts_us > cut]
        return len(late), (round((max(late) - cut) / 1000, 1) if late else None)

    # -- report ---------------------------------------------------------------------------
    def report(self, error: BaseException | None = None) -> dict[str, Any]:
        dest_nics = {n["mac"]: n for n in self.dest_report.get("nics", [])}
        per_nic = []
        dropped: dict[str, int] = {}
        replayed_total = 0
        for sn in self.nics:
            d = dest_nics.get(sn.nic.mac, {})
            nic_dropped = dict(sn.dropped)
            for k, v in d.get("dropped", {}).items():
                nic_dropped[k] = nic_dropped.get(k, 0) + v
            replayed = int(d.get("replayed", 0))
            dups = int(d.get("duplicates_suppressed", 0))
            replayed_total += replayed
            for k, v in nic_dropped.items():
                dropped[k] = dropped.get(k, 0) + v
            per_nic.append({"mac": sn.nic.mac, "tap": sn.nic.tap,
                            "swallowed_frame_recovered": sn.swallowed_recovered,
                            "frames_captured": sn.captured, "bytes_captured": sn.bytes_captured,
                            "frames_replayed": replayed, "duplicates_suppressed": dups,
                            "own_frames_ignored": sn.own_frames,
                            "tap_ring_overflow": sn.ring_overflow,
                            "frames_overflow_recovered": sn.overflow_recovered,
                            "shadow_dropped": sn.shadow.dropped if sn.shadow else sn.shadow_dropped_final,
                            "frames_dropped": nic_dropped})
        captured = sum(sn.captured for sn in self.nics)
        if self.completed and self.dest_report == {} and self.netpass_active:
            # The agent is gone: what it confirmed queuing is in the VM, the
            # rest of what we captured is lost, and we say so.
            replayed_total = self.agent_accepted
            unconfirmed = captured - self.agent_accepted - self.agent_dropped
            if unconfirmed:
                dropped["agent_unreachable"] = dropped.get("agent_unreachable", 0) + unconfirmed

        info = self.migration_info
        late_frames, last_late_ms = self._after_resume()
        return {
            "session": self.sid,
            "state": self.sm.state.value,
            "netpass": self.netpass_active,
            "error": str(error) if error else None,
            "error_kind": type(error).__name__ if error else None,
            "frames_captured": captured,
            "frames_replayed": replayed_total,
            "frames_returned_to_source": self.returned_to_source,
            "giveback_qemu_counts": self.giveback_counts,
            "duplicates_suppressed": sum(int(n.get("duplicates_suppressed", 0)) for n in dest_nics.values()),
            "frames_dropped": dropped,
            "drain_start_ms": self.drain_start_ms,
            "frames_overflow_recovered": sum(sn.overflow_recovered for sn in self.nics),
            "tap_ring_overflow": (sum(sn.ring_overflow for sn in self.nics)
                                  if all(sn.ring_overflow is not None for sn in self.nics) else None),
            "bytes_captured": sum(sn.bytes_captured for sn in self.nics),
            "bytes_wire": self.ch.bytes_out if self.ch else 0,
            "batches": self.seq,
            "batches_compressed": self.batches_compressed,
            "compress": self.o.compress,
            "link_rate_mbit": round(self.ch.link_rate * 8 / 1e6, 1) if self.ch and self.ch.link_rate else None,
            "link_peer_limited": (round(self.ch.peer_limited, 2)
                                  if self.ch and self.ch.peer_limited is not None else None),
            "downtime_ms": info.get("downtime"),
            "total_time_ms": info.get("total-time"),
            "stop_to_resume_ms": (round((self.resumed_t - self.stop_t) * 1000, 1)
                                  if self.resumed_t and self.stop_t else None),
            "replay_delay_ms": self.dest_report.get("replay_delay_ms"),
            "vm_replay_read_fps": self.dest_report.get("vm_replay_read_fps"),
            "agent_cpu_ms": self.dest_report.get("agent_cpu_ms"),
            "frames_after_resume": late_frames,
            "last_frame_after_resume_ms": last_late_ms,
            "destination_status": self.dest_status,
            "frames_lost_inside_qemu_recovered": sum(sn.swallowed_recovered for sn in self.nics),
            "reordered_estimate": self.dest_report.get("reordered_estimate"),
            "dest_ring_overflow": self.dest_report.get("dest_ring_overflow"),
            **({"pcap": self.o.save_pcap, "pcap_frames": self.pcap_written}
               if self.o.save_pcap else {}),
            "strict_ordering": self.o.strict_ordering,
            **({k: self.dest_report.get(k) for k in ("held_tx", "held_rx", "hold_ms", "hold_tx_ms",
                                                      "hold_timeout", "hold_dropped", "hold_late")}
               if self.o.strict_ordering else {}),
            "nics": per_nic,
            "notes": self.notes + list(self.dest_report.get("hold_notes", [])),
            "states": [s for _, s in self.sm.history],
        }


async def migrate(opts: MigrateOptions, progress: Progress | None = None) -> dict[str, Any]:
    sess = SourceSession(opts, progress)
    try:
        return await sess.run()
    except BaseException as exc:
        exc.report = getattr(sess, "final_report", sess.report(exc))  # type: ignore[attr-defined]
        raise


def _forget_before(frames: deque[tuple[int, bytes, bytes]], expect: int) -> None:
    """Drop the shadow's entries older than index ``expect``: already read."""
    while frames and frames[0][0] < expect:
        frames.popleft()


def qemu_losses(bounds: list[tuple[int, int, int, int]], accepted: int, used_final: int,
                wrap: int | None) -> tuple[set[int], int, int, int] | None:
    """How many accepted frames QEMU read and never delivered, from samples.

    Each sample, taken while the VM ran, is (accepted frames QEMU had read
    at the sample's start, at its end, the RX used index between, RX queues
    without a guest buffer).  While the VM runs, used = read + C - q, where
    q (0 up to the starved queues) counts frames QEMU holds for want of a
    guest buffer; so each sample bounds the constant C to
    [used - read_end, used - read_start + starved].  With C pinned, the
    frames read in all (``accepted``) less those delivered (``used_final``
    - C) are the ones lost.  The used index is 16-bit per queue: with
    ``wrap`` (one queue) the loss is taken modulo it.

    A sample can mislead: a guest that posted buffers but has not yet told
    QEMU (it tells once per batch) looks as if no frame could be held.  So
    C is taken where the most samples agree, if at least
    MIN_SAMPLE_AGREEMENT of them do.  Returns (the possible losses, C's
    bounds, the samples that disagree), or None if there are no samples or
    they agree too little.
    """
    if not bounds:
        return None
    edges: list[tuple[int, int]] = []
    for read_start, read_end, used, starved in bounds:
        edges += [(used - read_end, 1), (used - read_start + starved + 1, -1)]
    edges.sort()
    best, cover = 0, 0
    regions: list[range] = []  # where the most samples agree (ties: all of them)
    for i, (at, step) in enumerate(edges):
        cover += step
        nxt = edges[i + 1][0] if i + 1 < len(edges) else at
        if nxt > at and cover >= best:
            if cover > best:
                best, regions = cover, []
            regions.append(range(at, nxt))
    if best < MIN_SAMPLE_AGREEMENT * len(bounds):
        return None
    results = set()
    for const in itertools.islice(itertools.chain.from_iterable(regions), 65):
        lost = accepted - (used_final - const)
        if wrap is not None:
            lost = (lost + wrap // 2) % wrap - wrap // 2
        results.add(lost)
    return results, regions[0].start, regions[-1].stop - 1, len(bounds) - best


def _holds(last_rx: tuple[bytes, int], accepted: list[tuple[bytes, bytes]], lost: int) -> bool:
    """Whether the device's last filled buffer (its start, and the bytes it
    wrote) holds the frame that was delivered last if ``lost`` were lost."""
    i = len(accepted) - lost - 1
    if i < 0:
        return False
    data = accepted[i][1]
    buf, written = last_rx
    hdr = written - len(data)  # the guest's virtio-net header: 10 or 12 bytes
    return hdr in (10, 12) and buf[hdr:] == data[:len(buf) - hdr]


def _position(frames: deque[tuple[int, bytes, bytes]], expect: int, data: bytes) -> int | None:
    """Where ``data`` is among the shadow's entries from index ``expect`` on
    (older ones are dropped from the left first); None if not there."""
    _forget_before(frames, expect)
    if frames and frames[0][2] == data:
        return 0  # the usual case: nothing dropped in between
    return next((k for k, entry in enumerate(itertools.islice(frames, ALIGN_SCAN)) if entry[2] == data),
                None)
