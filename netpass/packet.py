"""AF_PACKET: the only module that opens packet sockets.

Replay uses an AF_PACKET socket bound to a tap with ``PACKET_VNET_HDR``:
each send takes a 10-byte virtio-net header followed by the frame, so GSO
and checksum-offload metadata survive the trip.  Sending on a tap queues
the frame toward the QEMU that reads it.

:class:`TxRing` does the same for many frames per system call: frames are
copied into the slots of a ``PACKET_TX_RING`` shared with the kernel and
one ``send()`` hands all of them to the tap.
"""

from __future__ import annotations

import errno
import logging
import mmap
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .errors import KernelError

log = logging.getLogger(__name__)

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
TPACKET_V2 = 1
TP_STATUS_SEND_REQUEST = 1
# struct tpacket2_hdr is 32 bytes; a TX frame's data starts right after it
# (tp_hdrlen - sizeof(struct sockaddr_ll) = 52 - 20).
TP2_DATA = 32
PACKET_OUTGOING = 4
PACKET_STATISTICS = 6
PACKET_STATS = struct.Struct("II")  # struct tpacket_stats: tp_packets, tp_drops
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
# Classic BPF: keep a frame only if the kernel is sending it out of the
# device (skb->pkt_type == PACKET_OUTGOING, an ancillary load), so the VM's
# own transmissions never reach the shadow's queue.
SKF_AD_PKTTYPE = 0xFFFFF000 + 4
OUTGOING_ONLY = [  # (code, jt, jf, k)
    (0x20, 0, 0, SKF_AD_PKTTYPE),   # ld  [pkttype]
    (0x15, 0, 1, PACKET_OUTGOING),  # jeq #PACKET_OUTGOING, keep, drop
    (0x06, 0, 0, 0xFFFFFFFF),       # keep: the whole frame
    (0x06, 0, 0, 0),                # drop
]
SHADOW_BUFFER = 64 << 20
ETH_P_ALL = 0x0003


class Injector:
    """Queue frames toward the reader of a tap (its VM)."""

    def __init__(self, ifname: str, vnet_hdr: bool = True, bypass: bool = True, mark: int = 0) -> None:
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        # Sends the device refused (ENOBUFS): each is one in its tx_dropped
        # (tun's full ring and __dev_direct_xmit's drop both count it), and
        # none is a loss, since the caller keeps the frame and retries.
        self.refused = 0
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            if mark:
                # An skb mark the device's egress rules can tell netpass's own frames by.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            if vnet_hdr:
                self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            if bypass:
                # Straight to the tap's xmit: no qdisc, no egress hooks, so a
                # frame netpass gives back is not steered away again.
                self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            self.sock.bind((ifname, 0))
        except OSError as exc:
            raise KernelError(f"cannot open an AF_PACKET socket on {ifname}: {exc}") from exc

    def send(self, vnet_hdr: bytes, frame: bytes | memoryview) -> bool:
        """Queue one frame; ``vnet_hdr`` is 10 bytes (zeros when unknown).

        False when the device had no room (ENOBUFS: a full tun ring, or a
        qdisc that dropped it): nothing was queued, the caller may retry.
        """
        try:
            if self.vnet_hdr:
                self.sock.sendmsg([vnet_hdr or bytes(10), frame])
            else:
                self.sock.send(frame)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.refused += 1
                return False
            raise KernelError(f"replay into {self.ifname} failed: {exc}") from exc
        return True

    def close(self) -> None:
        self.sock.close()


class TxRing:
    """Queue many frames toward a tap's reader with one system call.

    An AF_PACKET socket with a ``PACKET_TX_RING`` (TPACKET_V2): netpass
    copies each record (virtio-net header, then the frame) into a ring slot
    and marks it; one ``send()`` makes the kernel transmit every marked slot
    in order, straight to the tap (``PACKET_QDISC_BYPASS``).

    Two things about this path, both measured on the 6.18 kernel here:

    * By default the kernel copies only the Ethernet header into the skb and
      attaches the rest by reference to the slot's page; tun, which may keep
      the skb in its ring indefinitely, then copies those page fragments
      again (``skb_copy_ubufs``, a page allocation per frame), which made
      the ring slower than one ``sendmsg`` per frame (BENCHMARKS.md).  For
      a frame without GSO, netpass sets the virtio-net ``hdr_len`` to the
      whole frame, so the kernel copies it once into the skb; the VM never
      sees that field (tun writes a fresh header on the way out).  Without
      ``vnet_hdr`` there is no such field: use the ring with it.
    * tun releases a slot as soon as it queued the skb (it orphans it, after
      copying any fragment).  Slots are reused in ring order, and only once
      the kernel marked them available again.  The ring is 1024 slots
      (2 MiB), whatever the tap's ring: small enough to stay in the CPU's
      cache.  Sized at twice a 4096-frame tap ring (16 MiB), every slot
      was cold when filled again: copying a batch of 1500-byte frames in
      took 287-305 ns per frame against 101-117 with 512 to 4096 slots
      (BENCHMARKS.md).  A send longer than the ring goes round it.

    Frames larger than a slot (GSO super-frames) go through a plain socket,
    after the ring is flushed, so order is kept.
    """

    SLOTS = 1024

    def __init__(self, ifname: str, vnet_hdr: bool = True, bypass: bool = True,
                 frame_size: int = 2048) -> None:
        slots = self.SLOTS
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        self.bypass = bypass
        self.slots = slots
        self.frame_size = frame_size
        self.max_record = frame_size - TP2_DATA
        self.head = 0  # the next slot to fill: also the kernel's next slot to send
        self._refused = 0  # sends the device refused (see Injector.refused)
        self._big: Injector | None = None
        block = 1 << 16
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as exc:
            raise KernelError(f"cannot open an AF_PACKET socket on {ifname}: {exc}") from exc
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            if vnet_hdr:
                self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            if bypass:
                self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            # A frame the kernel finds malformed is skipped, not a stop of the whole ring.
            self.sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
            per_block = block // frame_size
            req = struct.pack("IIII", block, slots // per_block, frame_size, slots)
            self.sock.setsockopt(SOL_PACKET, PACKET_TX_RING, req)
            self.sock.bind((ifname, 0))
            self.mm = mmap.mmap(self.sock.fileno(), slots * frame_size)
            # The ring seen column-wise, one row per slot: a batch's slot
            # headers and frames are written with a few array operations,
            # not a Python step per frame.
            u32 = np.frombuffer(self.mm, np.uint32).reshape(slots, frame_size // 4)
            self._status = u32[:, 0]  # tp_status
            self._len = u32[:, 1]  # tp_len
            self._data = np.frombuffer(self.mm, np.uint8).reshape(slots, frame_size)[:, TP2_DATA:]
            # virtio_net_hdr.hdr_len (bytes 2-3 of the record): little-endian
            # on the little-endian hosts QEMU/KVM runs on (virtio 1.0 is LE).
            self._hdr_len = np.frombuffer(self.mm, "<u2").reshape(slots, frame_size // 2)[:, (TP2_DATA + 2) // 2]
        except OSError as exc:
            self.sock.close()
            raise KernelError(f"cannot set up an AF_PACKET TX ring on {ifname}: {exc}") from exc

    def send(self, records: Sequence[bytes | memoryview], start: int = 0, end: int | None = None) -> int:
        """Queue ``records[start:end]`` in order; return how many the tap took.

        Each record is the virtio-net header (10 bytes) followed by the frame
        when the ring was made with ``vnet_hdr``, else just the frame.  Fewer
        than asked means the tap refused the next one (its ring is full, as
        ``ENOBUFS`` for a single send): nothing after it was queued either.
        """
        chunk = records[start:end]
        if not chunk:
            return 0
        offs = np.zeros(len(chunk) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, chunk), np.int64, len(chunk)), out=offs[1:])
        return self.send_span(memoryview(b"".join(chunk)), offs, 0, len(chunk))

    def send_span(self, body: bytes | memoryview, offsets: npt.NDArray[np.int64], start: int, end: int) -> int:
        """:meth:`send` for records lying back to back in ``body``: record
        ``k`` is ``body[offsets[k]:offsets[k + 1]]``; queue those with
        ``start <= k < end`` and return how many the tap took."""
        src = np.frombuffer(body, np.uint8)
        done = start
        while done < end:
            n = self._fill(src, offsets, done, end)
            if n:
                taken = self._flush(n)
                done += taken
                if taken < n:
                    break
            if done < end and offsets[done + 1] - offsets[done] > self.max_record:
                if not self._send_big(memoryview(body)[offsets[done]:offsets[done + 1]]):
                    break
                done += 1
            elif not n:
                break  # no free slot: the kernel still holds them
        return done - start

    def _fill(self, src: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64], i: int, end: int) -> int:
        """Copy records from ``i`` into free slots from the head; how many.

        One fancy-indexing copy moves them all: every slot gets the same
        number of bytes (the longest record's), read from where its record
        starts; a slot's bytes past its record are never sent (``tp_len``).
        Only records too near the end of ``src`` for that are copied one by one.
        """
        h = self.head
        n = min(end - i, self.slots - h)  # up to the end of the ring; the caller loops
        starts = offsets[i:i + n]
        sizes = offsets[i + 1:i + n + 1] - starts
        big = sizes > self.max_record
        if big.any():
            n = int(big.argmax())
        busy = self._status[h:h + n]
        if busy.any():  # the kernel still holds some: fill up to the first
            n = int(busy.astype(bool).argmax())
        if not n:
            return 0
        starts, sizes = starts[:n], sizes[:n]
        width = int(sizes.max())
        fit = int(np.searchsorted(starts, len(src) - width, side="right"))
        if fit:
            # Every window of ``width`` bytes in src, without a copy.
            windows = np.ndarray((len(src) - width + 1, width), np.uint8, src, 0, (1, 1))
            self._data[h:h + fit, :width] = windows[starts[:fit]]
        for k in range(fit, n):
            s, size = int(starts[k]), int(sizes[k])
            self._data[h + k, :size] = src[s:s + size]
        if self.vnet_hdr:
            # No GSO: claim the whole frame as header, so the kernel copies it
            # into the skb instead of referencing the slot's page (which tun
            # would then copy again, a page per frame).
            hdr_len = self._hdr_len[h:h + n]
            no_gso = self._data[h:h + n, 1] == 0
            hdr_len[no_gso] = sizes[no_gso] - 10
        self._len[h:h + n] = sizes
        self._status[h:h + n] = TP_STATUS_SEND_REQUEST  # last: this hands the slots over
        return n

    def _flush(self, n: int) -> int:
        """Have the kernel send the ``n`` slots from the head; how many it took.

        ``_fill`` never wraps, so the ``n`` slots are contiguous.
        """
        try:
            sent = self.sock.send(b"", socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                self._unmark(0, n)
                raise KernelError(f"replay into {self.ifname} failed: {exc}") from exc
            # ENOBUFS: the device dropped the frame it refused (one in its
            # tx_dropped); EAGAIN: the socket's buffer was full, no drop.
            self._refused += exc.errno == errno.ENOBUFS
            sent = None
        h = self.head
        # The kernel sends in order and stops where the tap refused one: that
        # slot and the rest are still send requests.
        left = self._status[h:h + n] & TP_STATUS_SEND_REQUEST
        taken = n if not left[-1] else int(left.argmax())
        self._unmark(taken, n)
        if sent is not None:
            # The kernel counts the bytes after the virtio-net header.
            hdr = 10 if self.vnet_hdr else 0
            expect = int(self._len[h:h + taken].sum()) - hdr * taken
            if sent < expect:
                log.warning("%s: the kernel refused %d bytes of frames as malformed", self.ifname,
                            expect - sent)
        self.head = (h + taken) & (self.slots - 1)
        return taken

    def _unmark(self, first: int, n: int) -> None:
        """Give back slots head+first .. head+n-1 that the kernel did not take."""
        if first < n:
            self._status[self.head + first:self.head + n] = 0

    @property
    def refused(self) -> int:
        """Sends the device refused and dropped (each one in its tx_dropped);
        the frames themselves were kept for a retry."""
        return self._refused + (self._big.refused if self._big is not None else 0)

    def _send_big(self, rec: bytes | memoryview) -> bool:
        if self._big is None:
            self._big = Injector(self.ifname, vnet_hdr=self.vnet_hdr, bypass=self.bypass)
        if self.vnet_hdr:
            return self._big.send(bytes(rec[:10]), rec[10:])
        return self._big.send(b"", rec)

    def close(self) -> None:
        # The mmap cannot close while an array still views it (and a second
        # close finds them gone already).
        for view in ("_status", "_len", "_data", "_hdr_len"):
            self.__dict__.pop(view, None)
        self.mm.close()
        self.sock.close()
        if self._big is not None:
            self._big.close()


def send_frames(ifname: str, frames: list[bytes], bypass: bool = True) -> int:
    """Queue raw frames (no virtio-net header) on ``ifname``; how many went
    before the device first refused one (ENOBUFS), ``len(frames)`` if none."""
    inj = Injector(ifname, vnet_hdr=False, bypass=bypass)
    try:
        for i, frame in enumerate(frames):
            if not inj.send(b"", frame):
                return i
    finally:
        inj.close()
    return len(frames)


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program from the address in
    struct sock_fprog, so the array only has to live through the call."""
    import ctypes

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(program))(*[Insn(*i) for i in program])
    prog = Prog(len(program), ctypes.cast(insns, ctypes.POINTER(Insn)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))


# Classic BPF: like OUTGOING_ONLY, but keep only one byte of each frame.
OUTGOING_COUNT = [(0x20, 0, 0, SKF_AD_PKTTYPE), (0x15, 0, 1, PACKET_OUTGOING), (0x06, 0, 0, 1), (0x06, 0, 0, 0)]


class Tally:
    """How many frames the host has queued toward a tap, counted in the
    kernel: no frame is read.

    An AF_PACKET socket whose filter keeps one byte of each outgoing frame,
    with the smallest receive buffer: almost every copy is dropped at once,
    and ``PACKET_STATISTICS`` counts received and dropped alike
    (``tp_packets`` includes ``tp_drops``), resetting on each read.  The
    destination counts the live frames entering its tap this way while its
    hold's mirror has their content: reading each frame twice in Python cost
    the agent a third of a core under a 30,000 frames/s flood, CPU the
    destination VM needed.
    """

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.total = 0
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            _attach_filter(self.sock, OUTGOING_COUNT)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
            self.sock.bind((ifname, ETH_P_ALL))
            self.sock.setblocking(False)
        except OSError as exc:
            raise KernelError(f"cannot open a counting socket on {ifname}: {exc}") from exc

    def count(self) -> int:
        """Frames queued toward the tap since the last call."""
        packets, _drops = PACKET_STATS.unpack(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS,
                                                                   PACKET_STATS.size))
        self.total += packets
        return int(packets)

    def close(self) -> None:
        self.sock.close()


class Shadow:
    """A copy of every frame the host queues toward a tap, in ring order.

    AF_PACKET sees a frame in the transmit path just before tun queues it in
    its ring, so the shadow holds the ring's frames in ring order, each with
    its running index.  netpass keeps the last ``keep`` of them to find the
    frames the network delivers to the destination tap itself.
    """

    def __init__(self, ifname: str, keep: int = 16384) -> None:
        from collections import deque

        self.ifname = ifname
        self.frames: deque[tuple[int, bytes, bytes]] = deque(maxlen=keep)
        self.seen = 0
        self.dropped = 0  # copies the kernel dropped because this socket's buffer was full
        try:
            # Protocol 0 until bound: no frame of any other device is queued meanwhile.
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            _attach_filter(self.sock, OUTGOING_ONLY)
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            try:
                # Past net.core.rmem_max (212992 by default, a few hundred
                # frames): a burst must not outrun the copy (CAP_NET_ADMIN).
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SHADOW_BUFFER)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SHADOW_BUFFER)
            self.sock.bind((ifname, ETH_P_ALL))
            self.sock.setblocking(False)
        except OSError as exc:
            raise KernelError(f"cannot open a shadow socket on {ifname}: {exc}") from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def pull(self, limit: int = 100_000) -> int:
        """Take what the kernel has queued for us; return how many frames."""
        n = 0
        recv, append, seen = self.sock.recv, self.frames.append, self.seen
        try:
            while n < limit:
                buf = recv(65_600)  # only frames sent toward the tap: the filter dropped the rest
                append((seen + n, buf[:10], buf[10:]))
                n += 1
        except BlockingIOError:
            pass
        self.seen = seen + n
        if n:  # a full buffer leaves frames to read: only then can it have dropped any
            # (reading the statistics resets them: keep the sum)
            self.dropped += PACKET_STATS.unpack(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS,
                                                                     PACKET_STATS.size))[1]
        return n

    def index_of(self, frame: bytes, not_before: int = 0) -> int | None:
        """Running index of the oldest copy of ``frame`` at or after ``not_before``."""
        for idx, _vnet, data in self.frames:
            if idx >= not_before and data == frame:
                return idx
        return None

    def span(self, start: int, end: int) -> list[tuple[bytes, bytes]] | None:
        """Frames with running index in [start, end), or None if not all are kept."""
        if start < 0 or end < start or end > self.seen:
            return None
        if not self.frames or self.frames[0][0] > start:
            return None
        first = self.frames[0][0]
        items = list(self.frames)[start - first:end - first]
        return [(v, d) for _i, v, d in items]

    def close(self) -> None:
        self.sock.close()


PACKET_RX_RING = 5
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
SKF_AD_QUEUE = 0xFFFFF000 + 24
V3_STATS = struct.Struct("III")  # struct tpacket_stats_v3: tp_packets, tp_drops, tp_freeze_q_cnt
# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1:
# block_status (+8), num_pkts (+12), offset_to_first_pkt (+16), blk_len
# (+20), seq_num (+24, u64).  struct tpacket3_hdr: tp_next_offset (+0),
# tp_sec, tp_nsec, tp_snaplen (+12), tp_len (+16), tp_status, tp_mac (+24).
_U32 = struct.Struct("<I")
_PKT = struct.Struct("<IIIII")  # next_offset, sec, nsec, snaplen, len
_MAC = struct.Struct("<H")
VNET_LEN = 10  # struct virtio_net_hdr, written just before each frame (PACKET_VNET_HDR)


def outgoing_on_queue(queue: int | None) -> list[tuple[int, int, int, int]]:
    """Classic BPF: keep a frame the kernel sends out of the device (to its
    reader), and, with ``queue``, only one it queues on that queue
    (skb->queue_mapping, which tun's transmit uses as the queue's index)."""
    if queue is None:
        return OUTGOING_ONLY
    return [
        (0x20, 0, 0, SKF_AD_PKTTYPE),  # ld  [pkttype]
        (0x15, 0, 3, PACKET_OUTGOING),  # jeq #OUTGOING, next, drop
        (0x20, 0, 0, SKF_AD_QUEUE),  # ld  [queue]
        (0x15, 0, 1, queue),  # jeq #queue, keep, drop
        (0x06, 0, 0, 0xFFFFFFFF),  # keep
        (0x06, 0, 0, 0),  # drop
    ]


class ShadowRing:
    """The last frames the host queued toward a tap (one queue of it), kept
    by the kernel: no frame is read while the VM runs.

    A ``PACKET_RX_RING`` of TPACKET_V3 blocks mapped into this process: the
    kernel copies each frame sent toward the tap into the current block (its
    virtio-net header just before it) and hands the block over when it is
    full or ``RETIRE_MS`` old.  :meth:`keep_recent` hands the oldest blocks
    back so that the kernel always has room: the cost is per block, not per
    frame.  Should it fall behind anyway, the kernel drops frames and counts
    them (:attr:`dropped`): the copy is then not trusted where it has a gap.

    AF_PACKET sees a frame in the transmit path just before tun queues it in
    its ring, so the copy is in ring order.
    """

    BLOCK_SIZE = 256 << 10  # a 64 KiB GSO frame and its headers fit one block
    BLOCKS = 64  # 16 MiB of kernel memory a queue
    HISTORY = 16  # blocks kept at least: 4 MiB, some 2,600 frames of 1500 bytes (a tap ring is 1,000)
    # ... and more while they hold fewer frames than this: a block is handed
    # over RETIRE_MS after its first frame, so at a few thousand small frames
    # a second 16 blocks are 64 ms, less than a reader that holds a frame
    # for want of a guest buffer leaves queued behind it (fresh-ci on
    # 5d3e5fb: a frame QEMU held from 120 ms before its stop, not named).
    KEEP_FRAMES = 2048
    MAX_KEPT = 40  # (24 blocks, 6 MiB, stay the kernel's to fill: asked back every 10 ms at most then)
    RETIRE_MS = 4
    MIN_KEEP_S, MAX_KEEP_S = 0.002, 0.02  # (20 ms of 2.4 Gbit/s is half of 48 free blocks)

    def __init__(self, ifname: str, queue: int | None = None) -> None:
        self.ifname = ifname
        self.queue = queue
        self.dropped = 0  # frames the kernel could not copy (no free block)
        self.map: mmap.mmap | None = None
        self._next = 0  # the next block the kernel hands over (it fills them in turn)
        self._owned: deque[tuple[int, int]] = deque()  # (serial, block) handed over and kept, oldest first
        self._taken = 0  # blocks handed over so far (the next one's serial)
        self._clean_from = 0  # the first serial known to follow every drop
        self._kept_t = time.monotonic()
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            _attach_filter(self.sock, outgoing_on_queue(queue))
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frame = 2048
            req = struct.pack("7I", self.BLOCK_SIZE, self.BLOCKS, frame,
                              self.BLOCK_SIZE // frame * self.BLOCKS, self.RETIRE_MS, 0, 0)
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.map = mmap.mmap(self.sock.fileno(), self.BLOCK_SIZE * self.BLOCKS,
                                 mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.sock.bind((ifname, ETH_P_ALL))
        except OSError as exc:
            self.close()
            raise KernelError(f"cannot open a shadow ring on {ifname}: {exc}") from exc

    def _take_handed_over(self) -> int:
        """Add the blocks the kernel handed over since the last look to the
        kept ones; how many.  The kernel fills and hands over blocks in turn,
        so a cursor finds them: the cost is per block handed over, not per
        block of the ring."""
        assert self.map is not None
        mm, size, status = self.map, self.BLOCK_SIZE, TP_STATUS_USER
        b, n = self._next, 0
        for _ in range(self.BLOCKS - len(self._owned)):
            if not _U32.unpack_from(mm, b * size + 8)[0] & status:
                break
            self._owned.append((self._taken + n, b))
            b = (b + 1) % self.BLOCKS
            n += 1
        self._next = b
        self._taken += n
        return n

    def _look(self) -> int:
        """Count the kernel's drops, then take the blocks handed over.  A drop
        leaves a gap somewhere before the blocks handed over after it: every
        block taken so far is then behind a gap (``_clean_from``)."""
        _packets, drops, _freezes = V3_STATS.unpack(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS,
                                                                          V3_STATS.size))
        self.dropped += drops  # (reading the statistics resets them)
        n = self._take_handed_over()
        if drops:
            self._clean_from = self._taken
        return n

    def keep_recent(self) -> float:
        """Hand the oldest handed-over blocks back, keeping the newest
        ``HISTORY``, and more while those hold fewer than ``KEEP_FRAMES``
        frames (up to ``MAX_KEPT``); the seconds the kernel's free blocks
        last at the pace since the last call, a quarter of it: when to call
        again (2 to 20 ms, less with fewer free blocks: traffic can start at
        full pace between two calls)."""
        assert self.map is not None
        now = time.monotonic()
        n = self._look()
        owned, mm, size = self._owned, self.map, self.BLOCK_SIZE
        keep, frames = 0, 0
        for _serial, b in reversed(owned):
            if keep >= self.MAX_KEPT or (keep >= self.HISTORY and frames >= self.KEEP_FRAMES):
                break
            keep += 1
            frames += _U32.unpack_from(mm, b * size + 12)[0]
        while len(owned) > keep:
            _U32.pack_into(mm, owned.popleft()[1] * size + 8, TP_STATUS_KERNEL)
        rate = n / max(now - self._kept_t, 1e-3)
        self._kept_t = now
        free = self.BLOCKS - len(owned)
        longest = self.MAX_KEEP_S * free / (self.BLOCKS - self.HISTORY)
        return min(longest, max(self.MIN_KEEP_S, free / max(rate, 1.0) / 4))

    @property
    def kept_blocks(self) -> int:
        """Blocks handed over and kept (up to ``HISTORY`` after
        :meth:`keep_recent`).  A block holds fewer frames when the kernel
        hands it over ``RETIRE_MS`` after its first one, before it is full."""
        return len(self._owned)

    @staticmethod
    def keep_all(rings: Sequence[ShadowRing]) -> float:
        """:meth:`keep_recent` on each ring: when to call again, for the
        fastest of them (``MAX_KEEP_S`` with none)."""
        return min((ring.keep_recent() for ring in rings), default=ShadowRing.MAX_KEEP_S)

    def frames(self) -> list[tuple[bytes, bytes]]:
        """Every frame (virtio-net header, frame) in the handed-over blocks
        that follow the last gap (see :attr:`dropped`), oldest first.  The
        block being filled is handed over ``RETIRE_MS`` after its first
        frame: read this that long after the last frame."""
        assert self.map is not None
        self._look()
        mm, out = self.map, []
        for serial, b in self._owned:
            if serial < self._clean_from:
                continue
            base = b * self.BLOCK_SIZE
            n = _U32.unpack_from(mm, base + 12)[0]
            off = base + _U32.unpack_from(mm, base + 16)[0]
            for _ in range(n):
                nxt, _sec, _nsec, snap, length = _PKT.unpack_from(mm, off)
                mac = off + _MAC.unpack_from(mm, off + 24)[0]
                if snap == length:  # (a truncated copy is no copy)
                    out.append((mm[mac - VNET_LEN:mac], mm[mac:mac + snap]))
                else:
                    out.append((b"", b""))
                if not nxt:
                    break
                off += nxt
        return out

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        self.sock.close()
