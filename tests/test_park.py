"""The source's parking, on real taps in a throw-away namespace (no QEMU):
the nftables steering, the parking tap, the sacrificial frames per queue.

The test holds the 'VM' tap's fd and reads what the host queues toward it,
as QEMU would; frames come from a veth through a bridge, as the network's do.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack

import pytest

from netpass import links, netns, nft, sacrifice, tapfd
from netpass.packet import Injector
from netpass.park import Park

pytestmark = pytest.mark.kernel

VM = bytes.fromhex("020000000007")
PEER = bytes.fromhex("020000000009")


def frame(n: int, dst: bytes = VM) -> bytes:
    return dst + PEER + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(50)


def numbers(bufs: list[bytes], hdr: int = 10) -> list[int]:
    return [int.from_bytes(b[hdr + 14:hdr + 18], "big") for b in bufs if b[hdr + 6:hdr + 12] == PEER]


class Rig:
    """tap0 (the 'VM', our fd, on bridge br0 with veth v0); v1 is the network."""

    def __init__(self, root_required: None) -> None:
        self.ns = f"nptest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        netns.create(self.ns)
        self._ctx = netns.entered(self.ns)
        self._ctx.__enter__()
        self.fd = tapfd.open_tap("tap0", vnet_hdr=True)
        os.set_blocking(self.fd, False)
        links.set_txqueuelen(None, "tap0", 100_000)
        links.set_up(None, "tap0")
        links.add_veth(None, "v0", None, "v1")
        links.add_bridge(None, "br0")
        links.enslave(None, "tap0", "br0")
        links.enslave(None, "v0", "br0")
        self.net = Injector("v1", vnet_hdr=False, bypass=False)
        links.pin_mac(None, "tap0", ":".join(f"{b:02x}" for b in VM))  # the bridge sends VM frames to tap0
        self.undo = AsyncExitStack()
        self.steering = nft.Steering(f"nptest{uuid.uuid4().hex[:6]}")

    def vm_ring(self) -> list[bytes]:
        return tapfd.drain(self.fd, 1_000_000)

    def close(self) -> None:
        import asyncio

        try:
            self.steering.close()
            asyncio.run(self.undo.aclose())
            self.net.close()
            os.close(self.fd)
        finally:
            self._ctx.__exit__(None, None, None)
            netns.remove(self.ns)


@pytest.fixture
def rig(root_required: None) -> Iterator[Rig]:
    r = Rig(root_required)
    try:
        yield r
    finally:
        r.close()


def test_parking_steers_everything_in_order_and_loses_nothing_on_the_way(rig: Rig) -> None:
    """20,000 frames at full speed from the network while the steering is
    installed, switched on and off again: each reaches the VM or the
    parking tap, none is lost, each side in order."""
    n = 20_000
    box: dict[str, Park] = {}

    def send() -> None:
        for i in range(n):
            while not rig.net.send(b"", frame(i)):
                time.sleep(0.0001)
            if i == 2_000:
                box["park"] = Park.open("tap0", rig.steering, rig.undo)  # installed while traffic flows
            elif i == 8_000:
                box["park"].park()
            elif i == 14_000:
                box["park"].unpark()

    th = threading.Thread(target=send)
    th.start()
    th.join(60)
    time.sleep(0.1)
    park = box["park"]
    to_vm, parked = numbers(rig.vm_ring()), numbers(park.read(1_000_000))
    assert len(to_vm) + len(parked) == n, (len(to_vm), len(parked))
    assert sorted(to_vm + parked) == list(range(n))
    assert to_vm == sorted(to_vm) and parked == sorted(parked)
    assert 5_000 < len(parked) < 7_000  # what came while parked (sends are ~ordered with the switches)
    assert park.dropped() == 0 and links.info(None, "tap0").tx_dropped == 0


def test_netpass_own_frames_pass_the_parking(rig: Rig) -> None:
    """Sacrificial frames and frames given back carry netpass's mark: they
    reach the VM's ring while everything else is parked."""
    park = Park.open("tap0", rig.steering, rig.undo)
    park.park()
    own = Injector("tap0", bypass=True, mark=nft.OWN_MARK)
    plain = Injector("tap0", bypass=True)
    try:
        assert own.send(bytes(10), frame(1))
        plain.send(bytes(10), frame(2))  # bypassing the qdisc does not bypass the egress hook
        rig.net.send(b"", frame(3))
        time.sleep(0.05)
        assert numbers(rig.vm_ring()) == [1]
        assert numbers(park.read()) == [2, 3]
    finally:
        own.close()
        plain.close()


def test_the_parking_is_undone_whole(rig: Rig) -> None:
    import asyncio

    park = Park.open("tap0", rig.steering, rig.undo)
    park.park()
    name = park.name
    rig.steering.close()
    asyncio.run(rig.undo.aclose())
    assert not links.exists(None, name)
    rig.net.send(b"", frame(7))
    time.sleep(0.05)
    assert numbers(rig.vm_ring()) == [7]  # the VM's frames go their usual way again


@pytest.mark.parametrize("queues", [2, 4])
def test_sacrificial_frames_land_one_in_each_queue(root_required: None, queues: int) -> None:
    """The frames found on a throw-away tap go to the queue they were found
    for on another tap with as many queues (the flow hash's key is the
    kernel's), and the guest's IP layer would drop each (bad checksum)."""
    ns = f"nptest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    try:
        with netns.entered(ns):
            frames = sacrifice.per_queue(VM, b"abcdef", queues)
            assert len(frames) == queues and len(set(frames)) == queues
            fds = [tapfd.open_tap("mq0", vnet_hdr=True, multi_queue=True) for _ in range(queues)]
            for fd in fds:
                os.set_blocking(fd, False)
            links.set_up(None, "mq0")
            inj = Injector("mq0", bypass=True, mark=nft.OWN_MARK)
            try:
                for q, f in enumerate(frames):
                    assert inj.send(bytes(10), f)
                    select_readable(fds)
                    # Which queue has it (the kernel's own frames as the tap
                    # comes up, IPv6's, may be in any: seen in CI).
                    found = [i for i, fd in enumerate(fds) if f in _read_all(fd)]
                    assert found == [q], (q, found)
            finally:
                inj.close()
                for fd in fds:
                    os.close(fd)
        for f in frames:
            ihl = (f[14] & 0x0F) * 4
            assert f[12:14] == b"\x08\x00" and _checksum(f[14:14 + ihl]) != 0  # a broken header checksum
    finally:
        netns.remove(ns)


def _read_all(fd: int) -> list[bytes]:
    """The frames waiting on a tap fd, without their virtio-net header."""
    out = []
    while True:
        try:
            out.append(os.read(fd, 65536)[10:])
        except BlockingIOError:
            return out


def select_readable(fds: list[int]) -> list[tuple[int, int]]:
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return sorted(p.poll(200))


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_single_queue_sacrificial_frame_is_ours() -> None:
    f = sacrifice.frame(VM, b"abcdef")
    assert f[:6] == VM and f[6:9] == sacrifice.SRC_OUI and f[12:14] == sacrifice.ETHERTYPE
    assert len(f) >= 60
