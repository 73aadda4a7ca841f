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

import array
import errno
import logging
import mmap
import socket
import struct
from collections.abc import Sequence

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

    def __init__(self, ifname: str, vnet_hdr: bool = True, bypass: bool = True) -> None:
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
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

    def send(self, vnet_hdr: bytes, frame: bytes) -> bool:
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
    * tun releases a slot as soon as it queued the skb.  Slots are reused
      in ring order; the ring has at least twice the tap's ring
      (``queue_len``) slots, up to 16384, so a slot comes round again only
      after the frame it held has long left the tap.

    Frames larger than a slot (GSO super-frames) go through a plain socket,
    after the ring is flushed, so order is kept.
    """

    MAX_SLOTS = 1 << 14

    def __init__(self, ifname: str, vnet_hdr: bool = True, bypass: bool = True,
                 queue_len: int = 1000, frame_size: int = 2048) -> None:
        slots = 1024
        while slots < 2 * queue_len and slots < self.MAX_SLOTS:
            slots *= 2
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        self.bypass = bypass
        self.slots = slots
        self.frame_size = frame_size
        self.max_record = frame_size - TP2_DATA
        self.head = 0  # the next slot to fill: also the kernel's next slot to send
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
            self._status = memoryview(self.mm).cast("I")  # word 0 of a slot: tp_status, 1: tp_len
            # virtio_net_hdr.hdr_len, written through this view: little-endian
            # on the little-endian hosts QEMU/KVM runs on (virtio 1.0 is LE).
            self._half = memoryview(self.mm).cast("H")
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
        end = len(records) if end is None else end
        done = start
        while done < end:
            n = self._fill(records, done, end)
            if n:
                taken = self._flush(n)
                done += taken
                if taken < n:
                    break
            if done < end and len(records[done]) > self.max_record:
                if not self._send_big(records[done]):
                    break
                done += 1
            elif not n:
                break  # no free slot: the kernel still holds them
        return done - start

    def _fill(self, records: Sequence[bytes | memoryview], i: int, end: int) -> int:
        """Copy records from ``i`` into free slots from the head; how many.

        Slot headers are written column-wise through strided views of the
        ring (all lengths, then all statuses), so Python touches each frame
        once: its copy.
        """
        q = self.frame_size // 4
        n = min(end - i, self.slots - self.head)  # up to the end of the ring; the caller loops
        chunk = records[i:i + n]
        sizes = list(map(len, chunk))
        if sizes and max(sizes) > self.max_record:
            n = next(k for k, size in enumerate(sizes) if size > self.max_record)
            chunk, sizes = chunk[:n], sizes[:n]
        first = self.head * q
        busy = self._status[first:first + n * q:q]
        if any(busy):  # the kernel still holds some: fill up to the first
            n = next(k for k, st in enumerate(busy) if st)
            chunk, sizes = chunk[:n], sizes[:n]
        if not n:
            return 0
        mm, fs = self.mm, self.frame_size
        base = self.head * fs + TP2_DATA
        for off, rec in zip(range(base, base + n * fs, fs), chunk):
            mm[off:off + len(rec)] = rec
        if self.vnet_hdr:
            # No GSO: claim the whole frame as header, so the kernel copies it
            # into the skb instead of referencing the slot's page (which tun
            # would then copy again, a page per frame).
            h0 = (base + 2) // 2
            old = self._half[h0:h0 + n * (fs // 2):fs // 2].tolist()
            gso = self.mm[base + 1:base + 1 + n * fs:fs]
            hdr = array.array("H", [size - 10 if not g else o for size, g, o in zip(sizes, gso, old)])
            self._half[h0:h0 + n * (fs // 2):fs // 2] = hdr
        self._status[first + 1:first + 1 + n * q:q] = array.array("I", sizes)
        self._status[first:first + n * q:q] = array.array("I", [TP_STATUS_SEND_REQUEST]) * n
        return n

    def _flush(self, n: int) -> int:
        """Have the kernel send the ``n`` slots from the head; how many it took.

        ``_fill`` never wraps, so the ``n`` slots are contiguous: their
        statuses and lengths are read back column-wise, like they were written.
        """
        try:
            sent = self.sock.send(b"", socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                self._unmark(0, n)
                raise KernelError(f"replay into {self.ifname} failed: {exc}") from exc
            sent = None
        q = self.frame_size // 4
        first = self.head * q
        statuses = self._status[first:first + n * q:q]
        # Where the kernel stopped (the tap refused that one): still a send request.
        taken = next((k for k, st in enumerate(statuses) if st & TP_STATUS_SEND_REQUEST), n)
        self._unmark(taken, n)
        if sent is not None:
            # The kernel counts the bytes after the virtio-net header.
            hdr = 10 if self.vnet_hdr else 0
            expect = sum(self._status[first + 1:first + 1 + taken * q:q]) - hdr * taken
            if sent < expect:
                log.warning("%s: the kernel refused %d bytes of frames as malformed", self.ifname,
                            expect - sent)
        self.head = (self.head + taken) & (self.slots - 1)
        return taken

    def _unmark(self, first: int, n: int) -> None:
        """Give back slots head+first .. head+n-1 that the kernel did not take."""
        if first < n:
            q = self.frame_size // 4
            base = (self.head + first) * q
            self._status[base:base + (n - first) * q:q] = array.array("I", [0]) * (n - first)

    def _send_big(self, rec: bytes | memoryview) -> bool:
        if self._big is None:
            self._big = Injector(self.ifname, vnet_hdr=self.vnet_hdr, bypass=self.bypass)
        if self.vnet_hdr:
            return self._big.send(bytes(rec[:10]), rec[10:])
        return self._big.send(b"", rec)

    def close(self) -> None:
        self._status.release()
        self._half.release()
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
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))  # type: ignore[call-overload]


class Shadow:
    """A copy of every frame the host queues toward a tap, in ring order.

    AF_PACKET sees a frame in the transmit path just before tun queues it in
    its ring, so the shadow holds the ring's frames in ring order, each with
    its running index.  netpass keeps the last ``keep`` of them to find the
    frames QEMU read at the stop and never delivered (DESIGN §2).
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
