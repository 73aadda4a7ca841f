"""What a source session knows: its options, its NICs' records, and the
facts it gathers (times, counts, the phase).  Pure: no asyncio, no kernel,
no QMP.  The I/O that gathers the facts is in ``source.py``; what they mean
(the stop's path, how sure the account of the stop is, what may be lost)
is worked out here, so that it can be tested by feeding facts in.
"""

from __future__ import annotations

import itertools
import json
import operator
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire
from .endgame import Endgame
from .nics import Nic
from .packet import Injector, ShadowRing
from .park import Park
from .session import Phases

_SRC_MAC = operator.itemgetter(slice(6, 12))
# Memory a cached frame takes besides its own bytes: the Frame tuple, its
# virtio-net header, the bytes object's header, its timestamp and the slots
# in the cache and the send queue.  Measured 225 bytes per 64-byte frame on
# CPython 3.11 (RSS over 2,097,152 frames); counted against --max-cache-bytes,
# so that the cap bounds memory, not only frame bytes (4.5x at 64 B without).
CACHE_FRAME_OVERHEAD = 256

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
    strict_ordering: bool = False
    hold_timeout_ms: int = 3000
    save_pcap: str | None = None
    compress: str = "auto"
    state_dir: Path = Path("/run/netpass")  # the guard's state files (see srcguard.py)
    # Transparent mode (``follow.py``): a migration libvirt started, followed
    # through libvirt (this URI) for the domain with this UUID; netpass does
    # not issue the migration, and ``qmp``, ``uri`` and ``dest_qmp`` are unused.
    libvirt_uri: str | None = None
    libvirt_uuid: str | None = None

    @property
    def qemu_address(self) -> str:
        """Where the source QEMU's monitor is: its QMP socket, or (attached)
        ``libvirt:UUID@URI``, as the guard's state file records it."""
        return f"libvirt:{self.libvirt_uuid}@{self.libvirt_uri}" if self.attached else self.qmp

    @property
    def attached(self) -> bool:
        """netpass follows a migration someone else (libvirt) drives."""
        return self.libvirt_uuid is not None


@dataclass
class SourceNic:
    index: int
    nic: Nic
    fds: list[int]  # QEMU's tap queues, duplicated into this process (detached ones read nothing)
    hdr_size: int
    mac_bytes: bytes
    park: Park  # (the bench reads a tap it filled instead)
    inject: Injector | None  # netpass's own frames into the VM's ring, past the parking (made at arm: 7 ms)
    sacrificial: list[bytes] = field(default_factory=list)  # one per attached queue
    bridge: str | None = None
    pinned: bool = False
    captured: int = 0
    bytes_captured: int = 0
    own_frames: int = 0
    vm_ring_drained: int = 0  # after an unforeseen stop: frames netpass read from the VM's own ring
    dropped: dict[str, int] = field(default_factory=dict)
    tx_dropped0: int = 0  # the VM ring's drop counter at arm time
    ring_overflow: int | None = None
    park_overflow: int | None = None
    shadows: list[ShadowRing] = field(default_factory=list)  # per queue: what was queued toward it
    drained: dict[int, list[bytes]] = field(default_factory=dict)  # per fd: real frames read after the stop
    qemu_held: int | None = None  # after the stop: queues whose reader held a real frame
    recovered: int = 0  # ... of which netpass had the frame in its shadow ring, and sends it on
    undecided: int = 0  # queues whose reader's state the source QEMU took with it
    vdev: str | None = None  # QOM path of its virtio device (for the RX queues' state after a stop)
    starved: dict[int, bool] = field(default_factory=dict)  # after a stop: queue -> the guest had no RX buffer
    used_lens: dict[int, list[int]] = field(default_factory=dict)  # after QEMU's own stop: queue -> the
    # lengths QEMU wrote into the guest's last RX buffers (see stopaccount.dropped_in_stop_window)
    used_tails: dict[int, bytes] = field(default_factory=dict)  # ... queue -> the first bytes of the last
    # of them (see nics.used_tail)
    window: dict[int, bool] = field(default_factory=dict)  # ... queue -> QEMU dropped a frame its reader
    # took while the vCPUs stopped (sent on from the shadow ring), as the guest's used ring told
    tx_at_stop: int | None = None  # the tap's tx_packets (frames read from its rings) when netpass saw the stop
    reads_at_stop: int = 0  # vm_ring_drained then (netpass's own reads count in tx_packets too)
    own_set: set[bytes] = field(default_factory=set)  # netpass's own frames (sacrificial, first and second)
    own_seen: set[bytes] = field(default_factory=set)  # those netpass read back from the VM's ring

    def __post_init__(self) -> None:
        self.own_set.update(self.sacrificial)

    def told(self, q: int) -> bool:
        """After QEMU's own stop: whether netpass knows if QEMU dropped a
        frame its reader of queue ``q`` took while the vCPUs stopped.  The
        guest's used ring told, or the guest had no buffer on ``q``: then
        that reader already held a frame, read nothing more until the stop
        purged it, and took no other."""
        return q in self.window or bool(self.starved.get(q))

    @property
    def own(self) -> Injector:
        assert self.inject is not None, "this NIC cannot send netpass's own frames (a bench stand-in)"
        return self.inject

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class SourceState:
    """The facts of one source session, and what they mean.  Times are
    ``time.monotonic()`` values (None: not seen)."""

    def __init__(self, opts: MigrateOptions, sid: str) -> None:
        self.o = opts
        self.sid = sid
        self.phases = Phases(sid)
        self.nics: list[SourceNic] = []
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.arm_steps: dict[str, float] = {}  # step -> ms since the session began (report)
        self.notes: list[str] = []
        self.netpass_active = True
        self.migrate_issued = False
        self.external_pause = False
        self.was_running = True
        self.qemu_params: dict[str, Any] = {}
        self.endgame: Endgame | None = None
        # -- capture and ship
        self.cache: list[wire.Frame] = []
        self.cache_bytes = 0
        self.outq: deque[wire.Frame] = deque()
        self.last_frame_t = 0.0
        self.seq = 0
        self.batches_compressed = 0
        self.shipped = 0
        self.unacked: dict[int, list[wire.Frame]] = {}
        self.pcap_frames: list[wire.Frame] = []
        self.pcap_written: int | None = None
        # -- what the agent said
        self.agent_accepted = 0
        self.agent_dropped = 0
        self.agent_duplicates = 0  # frames the agent skipped as delivered there already
        self.agent_fed = 0  # frames the agent said are in the VM's rings
        self.direct_seen = False
        self.dest_report: dict[str, Any] = {}
        self.dest_status: str | None = None
        # -- the stop
        self.parked_t: float | None = None
        # This process's CPU time (process_time) when per-frame work began: the park, or
        # a stop netpass did not park for; what came before is the live phase's cost.
        self.live_end_cpu: float | None = None
        self.verified_t: float | None = None  # QEMU read every sacrificial frame
        self.qmp_rtt_s = 0.002  # a QMP command's round trip, learned
        self.stop_t: float | None = None  # QEMU stopped the VM (its own clock, on ours)
        self.unforeseen = False  # the VM stopped before netpass parked
        self.prepared = False  # the destination was told the park is near
        self.settled_told = False  # strict: the destination was told no forwarded frame is still due
        self.settling = False  # after a stop netpass did not foresee: nothing ships until it is settled
        self.stopped_by_migration = False  # (after an unforeseen stop) QEMU's own, to complete
        self.vm_rings_drained = False  # netpass reads what reaches the VM's own rings (after such a stop)
        self.completed = False
        self.migration_info: dict[str, Any] = {}
        self.resumed_t: float | None = None
        self.returned_to_source = 0
        self.straggler_frames = 0

    def ms(self, t: float | None, since: float | None = None) -> float | None:
        """``t`` in ms since ``since`` (the session's start by default)."""
        if t is None:
            return None
        return round((t - (self.t0 if since is None else since)) * 1000, 1)

    def verified_before_stop(self) -> bool:
        return self.verified_t is not None and self.stop_t is not None and self.verified_t <= self.stop_t

    def stop_path(self) -> str | None:
        if not self.netpass_active or self.stop_t is None:
            return None
        return "unforeseen" if self.unforeseen else "parked"

    def swallowed_account(self) -> str | None:
        """How sure netpass is of what QEMU swallowed at its stop: ``exact``
        when QEMU had read every sacrificial frame before it stopped;
        ``inferred`` when QEMU's readers and the guest's RX queues settled
        it after the stop (each reader took netpass's second sacrificial
        frame, or left it: then it held a frame; a queue the guest had no
        buffer on lost the frame QEMU held for it at the stop; after QEMU's
        own stop, the guest's used rings told whether QEMU dropped a frame
        its reader took while the vCPUs stopped; each such frame is sent on
        from the shadow ring, or counted lost); ``unknown`` when the source
        QEMU went before they could say, or its used rings did not tell."""
        if self.stop_path() is None:
            return None
        if not self.unforeseen and self.verified_before_stop():
            return "exact"
        if all(sn.qemu_held is not None and sn.undecided == 0 and
               all(q in sn.starved and (not self.stopped_by_migration or sn.told(q))
                   for q in range(len(sn.sacrificial))) for sn in self.nics):
            return "inferred"
        return "unknown"

    def network_pause_ms(self) -> float | None:
        """From the moment no frame reached the VM any more (the park, or
        the stop when it came first) to the destination's resume."""
        starts = [t for t in (self.parked_t, self.stop_t) if t is not None]
        if self.resumed_t is None or not starts:
            return None
        return self.ms(self.resumed_t, min(starts))

    def after_resume(self) -> tuple[int, float | None]:
        """Frames captured after the destination resumed, and how late the last came (ms)."""
        if self.resumed_t is None:
            return 0, None
        cut = (self.resumed_t - self.t0) * 1e6
        late = [f.ts_us for f in self.cache if f.ts_us > cut]
        return len(late), (round((max(late) - cut) / 1000, 1) if late else None)

    def captured(self) -> int:
        return sum(sn.captured for sn in self.nics)

    def unconfirmed(self) -> int:
        """Frames captured that the agent did not confirm in the VM's rings
        (or dropped, or delivered there directly): lost, should the agent
        vanish.  Never fewer than were lost; more by what it put into a ring
        and had not yet reported (under FED_REPORT_FRAMES, or its last
        FED_REPORT_S at a slow feed), if it vanished after the resume."""
        return max(0, self.captured() - self.agent_fed - self.agent_dropped - self.agent_duplicates)

    # -- capture: the frames read from the parking taps (and the VM's rings) ---------------
    def took_from_vm_ring(self, sn: SourceNic, fd: int, bufs: list[bytes], now: float) -> None:
        """Frames netpass read from the VM's own ring (queue ``fd``): after
        the stop, the real ones are kept apart too, for the stop's account."""
        sn.vm_ring_drained += len(bufs)
        if bufs and self.stop_t is not None:
            hdr, own = sn.hdr_size, sn.own_set
            sn.drained.setdefault(fd, []).extend(d for d in (b[hdr:] for b in bufs) if d not in own)
        self.take(sn, bufs, sn.hdr_size, now)

    def take(self, sn: SourceNic, bufs: list[bytes], hdr: int, now: float) -> None:
        """Capture a round of tap reads (each ``hdr`` bytes of virtio-net
        header, then the frame), in order: in one go when the round is the
        usual one, frame by frame otherwise."""
        if not bufs or self._take_round(sn, bufs, hdr, now):
            return
        for buf in bufs:
            data = buf[hdr:]
            if data in sn.own_set:
                sn.own_seen.add(data)  # our own, back from the VM's ring (see srcsettle.py)
                continue
            self._capture(sn, buf[:wire.VNET_HDR_LEN] if hdr else b"", data, now)

    def _take_round(self, sn: SourceNic, bufs: list[bytes], hdr: int, now: float) -> bool:
        """The usual round of reads in one go: no runt, none of the VM's own,
        none of netpass's own, room in the cache.  Same outcome as the
        per-frame path, with the per-frame work in C (map); False, and
        nothing done, when anything is unusual."""
        datas = list(map(operator.itemgetter(slice(hdr, None)), bufs)) if hdr else bufs
        sizes = list(map(len, datas))
        total = sum(sizes)
        cost = total + CACHE_FRAME_OVERHEAD * len(datas)
        if min(sizes) < wire.MIN_FRAME or self.cache_bytes + cost > self.o.max_cache_bytes or \
                sn.mac_bytes in map(_SRC_MAC, datas) or any(map(sn.own_set.__contains__, datas)):
            return False
        ts = int((now - self.t0) * 1e6)
        vnets = map(operator.itemgetter(slice(0, wire.VNET_HDR_LEN)), bufs) if hdr else itertools.repeat(b"")
        # tuple.__new__ builds each Frame in C (a NamedTuple's own __new__ is Python)
        batch = list(map(tuple.__new__, itertools.repeat(wire.Frame),
                         zip(itertools.repeat(sn.index), vnets, datas, itertools.repeat(ts))))
        self.last_frame_t = now
        sn.captured += len(batch)
        sn.bytes_captured += total
        self.cache += batch
        self.cache_bytes += cost
        self.outq += batch
        return True

    def _capture(self, sn: SourceNic, vnet: bytes, data: bytes, now: float) -> None:
        if len(data) < wire.MIN_FRAME:
            sn.drop("runt")
            return
        if data[6:12] == sn.mac_bytes:
            # The VM's own transmissions (its announcements from the
            # destination, flooded back to us): never give a VM its own frames.
            sn.own_frames += 1
            return
        self.last_frame_t = now
        if self.cache_bytes + len(data) + CACHE_FRAME_OVERHEAD > self.o.max_cache_bytes:
            sn.drop("cache_full")
            return
        f = wire.Frame(sn.index, vnet, data, int((now - self.t0) * 1e6))
        sn.captured += 1
        sn.bytes_captured += len(data)
        self.cache.append(f)
        self.cache_bytes += len(data) + CACHE_FRAME_OVERHEAD
        self.outq.append(f)

    # -- what the agent says -----------------------------------------------------------------
    def agent_said(self, payload: bytes | memoryview) -> dict[str, Any] | None:
        """Take in one control message from the agent: counts are recorded
        here; a message someone waits on is returned.  Anything malformed is
        a ValueError, and changes nothing."""
        msg = json.loads(bytes(payload))
        if not isinstance(msg, dict):
            raise ValueError("not an object")
        op = msg.get("op")
        if op == "direct":
            self.direct_seen = True
            return None
        if op == "fed":
            self.agent_fed = max(self.agent_fed, _count(msg, "fed"))
            return None
        if op != "ack":
            return msg
        accepted, dropped, fed = _count(msg, "accepted"), _count(msg, "dropped"), _count(msg, "fed")
        skipped = msg.get("skipped") or []
        if not isinstance(skipped, list) or not all(isinstance(i, int) for i in skipped):
            raise ValueError("skipped is not a list of indexes")
        seq = msg.get("seq", -1)
        if not isinstance(seq, int):
            raise ValueError("seq is not an integer")
        self.agent_accepted += accepted
        self.agent_dropped += dropped
        self.agent_duplicates += max(0, len(skipped) - dropped)
        self.agent_fed = max(self.agent_fed, fed)
        sent = self.unacked.pop(seq, None)
        if sent is not None:
            gone = set(skipped)
            self.pcap_frames += [f for i, f in enumerate(sent) if i not in gone]
        return None



def _count(msg: dict[str, Any], key: str) -> int:
    """A non-negative integer field of an agent's message (0 when absent)."""
    value = msg.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 53:
        raise ValueError(f"{key} is not a count")
    return value
