"""AF_PACKET: the only module that opens packet sockets.

Replay uses an AF_PACKET socket bound to a tap with ``PACKET_VNET_HDR``:
each send takes a 10-byte virtio-net header followed by the frame, so GSO
and checksum-offload metadata survive the trip.  Sending on a tap queues
the frame toward the QEMU that reads it.
"""

from __future__ import annotations

import logging
import socket

from .errors import KernelError

log = logging.getLogger(__name__)

SOL_PACKET = 263
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003


class Injector:
    """Queue frames toward the reader of a tap (its VM)."""

    def __init__(self, ifname: str, vnet_hdr: bool = True) -> None:
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            if vnet_hdr:
                self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            self.sock.bind((ifname, 0))
        except OSError as exc:
            raise KernelError(f"cannot open an AF_PACKET socket on {ifname}: {exc}") from exc

    def send(self, vnet_hdr: bytes, frame: bytes) -> None:
        """Queue one frame; ``vnet_hdr`` is 10 bytes (zeros when unknown)."""
        try:
            if self.vnet_hdr:
                self.sock.sendmsg([vnet_hdr or bytes(10), frame])
            else:
                self.sock.send(frame)
        except OSError as exc:
            raise KernelError(f"replay into {self.ifname} failed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()
