"""Sacrificial frames: frames of netpass's own that the guest drops, one for
each queue of a tap.

netpass sends one into each of the VM tap's queues once the VM's frames are
parked: when QEMU has read it, QEMU's reader of that queue was free, so every
real frame before it had been handed to the guest (QEMU stops reading a tap
queue while it holds a frame the guest has no buffer for).  If QEMU stops the
VM while holding one, the sacrificial frame is what it loses.

tun picks a multi-queue tap's queue by a hash of the frame's flow (or by the
flow table its reader's own transmissions filled), so a frame for queue k
is found by trial on a throw-away tap with as many queues: the hash's key is
the kernel's, the same for every device.  The frames are IPv4/UDP with a
broken header checksum, which any IP stack drops on arrival; a single-queue
tap gets an IEEE 802 local experimental EtherType frame instead.
"""

from __future__ import annotations

import logging
import os
import select
import struct

from . import links, tapfd
from .errors import KernelError
from .packet import Injector

log = logging.getLogger(__name__)

ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental: the guest has no handler for it
SRC_OUI = bytes.fromhex("026e70")  # locally administered, "np"
TRIES_PER_QUEUE = 64


def frame(vm_mac: bytes, tag: bytes) -> bytes:
    """The single-queue sacrificial frame: to the VM's MAC, from a local MAC."""
    body = b"netpass sacrificial frame " + tag
    return vm_mac + SRC_OUI + tag[:3].ljust(3, b"\0") + ETHERTYPE + body.ljust(46, b"\0")


def ipv4_candidate(vm_mac: bytes, tag: bytes, i: int) -> bytes:
    """An IPv4/UDP frame whose flow hash varies with ``i`` and whose IP
    header checksum is wrong (so the guest's IP layer drops it)."""
    payload = b"netpass sacrificial frame " + tag
    udp_len = 8 + len(payload)
    total = 20 + udp_len
    src, dst = bytes([192, 0, 2, 1 + (i >> 8) % 250]), bytes([192, 0, 2, 254])
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, i & 0xFFFF, 0, 1, 17, 0, src, dst)
    csum = _checksum(hdr) ^ 0x5A5A  # deliberately wrong
    hdr = hdr[:10] + struct.pack("!H", csum) + hdr[12:]
    udp = struct.pack("!HHHH", 40_000 + i % 20_000, 9, udp_len, 0)
    eth = vm_mac + SRC_OUI + tag[:3].ljust(3, b"\0") + b"\x08\x00"
    return (eth + hdr + udp + payload).ljust(60, b"\0")


def second(frame: bytes) -> bytes:
    """Another sacrificial frame for the same queue: the same flow (tun's hash
    covers addresses and ports, not MACs), another source MAC."""
    return frame[:11] + bytes([frame[11] ^ 0x80]) + frame[12:]


def _checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def per_queue(vm_mac: bytes, tag: bytes, queues: int) -> list[bytes]:
    """One sacrificial frame for each of ``queues`` queues, in queue order."""
    if queues <= 1:
        return [frame(vm_mac, tag)]
    return _calibrate(vm_mac, tag, queues)


def _calibrate(vm_mac: bytes, tag: bytes, queues: int) -> list[bytes]:
    name = f"npcal{os.urandom(3).hex()}"
    fds: list[int] = []
    found: dict[int, bytes] = {}
    try:
        for _ in range(queues):
            fds.append(tapfd.open_tap(name, vnet_hdr=True, multi_queue=True))
        for fd in fds:
            os.set_blocking(fd, False)
        links.disable_ipv6(name)
        links.set_up(None, name)
        inj = Injector(name, vnet_hdr=True, bypass=True)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            for i in range(queues * TRIES_PER_QUEUE):
                cand = ipv4_candidate(vm_mac, tag, i)
                if not inj.send(bytes(10), cand):
                    raise KernelError(f"{name} refused a calibration frame")
                ready = {fd for fd, _ev in poller.poll(100)}
                for q, fd in enumerate(fds):
                    if fd in ready:
                        tapfd.drain(fd, 16)
                        found.setdefault(q, cand)
                if len(found) == queues:
                    break
        finally:
            inj.close()
    finally:
        for fd in fds:
            os.close(fd)
    if len(found) < queues:
        raise KernelError(f"found sacrificial frames for {len(found)} of {queues} tap queues")
    log.info("sacrificial frames found for %d queues", queues)
    return [found[q] for q in range(queues)]
