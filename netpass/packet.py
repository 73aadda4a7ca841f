"""AF_PACKET: the only module that opens packet sockets.

Replay uses an AF_PACKET socket bound to a tap with ``PACKET_VNET_HDR``:
each send takes a 10-byte virtio-net header followed by the frame, so GSO
and checksum-offload metadata survive the trip.  Sending on a tap queues
the frame toward the QEMU that reads it.
"""

from __future__ import annotations

import errno
import logging
import socket

from .errors import KernelError

log = logging.getLogger(__name__)

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_OUTGOING = 4
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
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
            self.sock.bind((ifname, ETH_P_ALL))
            self.sock.setblocking(False)
        except OSError as exc:
            raise KernelError(f"cannot open a shadow socket on {ifname}: {exc}") from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def pull(self, limit: int = 100_000) -> int:
        """Take what the kernel has queued for us; return how many frames."""
        n = 0
        while n < limit:
            try:
                buf, addr = self.sock.recvfrom(65_600)
            except BlockingIOError:
                break
            if addr[2] != PACKET_OUTGOING:
                continue  # the VM's own transmissions
            self.frames.append((self.seen, buf[:10], buf[10:]))
            self.seen += 1
            n += 1
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
