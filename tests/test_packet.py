"""The replay TX ring on a real tap: order, content, a full ring, wraps, big
frames; the shadow ring: what it keeps, in order, and a gap.

No QEMU: the test holds the tap's fd and plays the VM, reading what the ring
queued toward it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from netpass import links, netns, tapfd
from netpass.packet import Shadow, ShadowRing, TxRing

VM = bytes.fromhex("020000000007")
PEER = bytes.fromhex("020000000009")


def record(n: int, size: int = 60, gso: int = 0) -> bytes:
    vnet = bytes([0, gso]) + bytes(8)
    return vnet + VM + PEER + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(size - 18)


@pytest.fixture
def tap(root_required: None) -> Iterator[int]:
    ns = f"nptest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    try:
        with netns.entered(ns):
            with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as fh:
                fh.write("1")  # no kernel chatter on the tap
            fd = tapfd.open_tap("tap0", vnet_hdr=True)
            os.set_blocking(fd, False)
            links.set_txqueuelen(None, "tap0", 100)
            links.set_up(None, "tap0")
            try:
                yield fd
            finally:
                os.close(fd)
    finally:
        netns.remove(ns)
    assert not netns.exists(ns)


def read_all(fd: int) -> list[bytes]:
    return tapfd.drain(fd, 100_000)


def test_order_content_and_a_full_ring(tap: int) -> None:
    ring = TxRing("tap0")
    assert ring.slots == 1024
    recs = [record(i, size=60 + i % 900) for i in range(5000)]
    got: list[bytes] = []
    done = 0
    short = 0
    while done < len(recs):
        n = ring.send(recs, done)
        if n < len(recs) - done:
            short += 1  # the tap's ring (100 frames) is full: the 'VM' reads
            got += read_all(tap)
        done += n
    got += read_all(tap)
    ring.close()
    assert short > 0  # the test did fill the tap's ring, many times over the 1024 slots
    assert len(got) == len(recs)
    # Each frame whole and in order (the VM reads a fresh virtio-net header).
    assert [g[10:] for g in got] == [r[10:] for r in recs]


def test_big_frames_in_order(tap: int) -> None:
    import subprocess

    subprocess.run(["ip", "link", "set", "tap0", "mtu", "9000"], check=True)  # (in the test's namespace)
    ring = TxRing("tap0")
    small = record(1)
    big = record(2, size=4000)  # larger than a slot: the plain socket, after the ring
    tail = record(3)
    assert ring.send([small, big, tail]) == 3
    got = read_all(tap)
    ring.close()
    assert [g[10:] for g in got] == [small[10:], big[10:], tail[10:]]


def test_refusal_leaves_nothing_half_queued(tap: int) -> None:
    ring = TxRing("tap0")
    dropped0 = links.info(None, "tap0").tx_dropped
    recs = [record(i) for i in range(300)]
    first = ring.send(recs)
    assert 0 < first < 300  # the tap took what its ring holds, then refused
    assert ring.send(recs, first) == 0  # still full: nothing more, nothing twice
    # Each refusal is one in the tap's drop counter, and the agent's report
    # takes them out of the ring's overflow (the frames were kept).
    assert ring.refused == 2
    assert links.info(None, "tap0").tx_dropped - dropped0 == ring.refused
    got = read_all(tap)
    rest = ring.send(recs, first)
    got += read_all(tap)
    ring.close()
    assert [g[10:] for g in got][:first + rest] == [r[10:] for r in recs[:first + rest]]
    assert len(got) == first + rest


def test_a_gso_frame_the_tap_cannot_take_yet_is_a_refusal(tap: int) -> None:
    """A tap whose reader has not set its offloads (the destination QEMU
    before it loads the VM's state) refuses a TCP GSO frame: the kernel
    drops it in __dev_direct_xmit, counted in tx_dropped; the ring keeps it."""
    import struct

    payload = 3000
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + payload, 1, 0x4000, 64, 6, 0,
                     bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, 5 << 4, 0x10, 65535, 0, 0)
    # virtio-net header: NEEDS_CSUM, GSO TCPv4, hdr_len, gso_size 1448, csum at the TCP header
    vnet = struct.pack("<BBHHHH", 1, 1, 14 + 40, 1448, 14 + 20, 16)
    frame = vnet + VM + PEER + b"\x08\x00" + ip + tcp + bytes(payload)
    ring = TxRing("tap0")
    dropped0 = links.info(None, "tap0").tx_dropped
    assert ring.send([frame]) == 0
    assert ring.refused == 1
    assert links.info(None, "tap0").tx_dropped - dropped0 == 1
    assert read_all(tap) == []
    ring.close()


def test_shadow_copies_only_what_goes_toward_the_tap(tap: int) -> None:
    """The shadow holds, in order, each frame the host sends toward the tap
    (with its virtio-net header); not what the VM sends, nor another
    device's traffic."""
    shadow = Shadow("tap0")
    try:
        links.add_bridge(None, "npbr0")  # another device of the namespace, up: its own traffic
        ring = TxRing("tap0", bypass=False)  # the transmit path, as a bridge's
        recs = [record(i, size=60 + i) for i in range(50)]
        assert ring.send(recs) == 50
        ring.close()
        for i in range(5):  # the VM's own transmissions
            os.write(tap, record(1000 + i)[:10] + PEER + VM + b"\x88\xb5" + bytes(50))
        other = TxRing("npbr0", bypass=False)
        assert other.send([record(2000 + i) for i in range(5)]) == 5
        other.close()
        assert shadow.pull() == 50
        assert [(i, v + d) for i, v, d in shadow.frames] == list(enumerate(recs))
        assert shadow.pull() == 0 and shadow.seen == 50
    finally:
        shadow.close()


def _send_through(tap: int, first: int, count: int, size: int, keep: ShadowRing | None = None) -> None:
    """``count`` frames toward the tap through the transmit path, 100 at a
    time (its ring), read by the 'VM' as they come; ``keep`` kept after each."""
    ring = TxRing("tap0", bypass=False)
    try:
        for start in range(first, first + count, 100):
            recs = [record(i, size) for i in range(start, min(start + 100, first + count))]
            assert ring.send(recs) == len(recs)
            assert len(read_all(tap)) == len(recs)
            if keep is not None:
                keep.keep_recent()
    finally:
        ring.close()


def _numbers(shadow: ShadowRing) -> list[int]:
    time.sleep(2 * ShadowRing.RETIRE_MS / 1000 + 0.005)  # the block being filled is handed over
    out = []
    for vnet, data in shadow.frames():
        assert len(vnet) == 10 and data[:6] == VM and len(data) == 1400
        out.append(int.from_bytes(data[14:18], "big"))
    return out


def test_shadow_ring_keeps_the_newest_frames_in_order_across_wraps(tap: int) -> None:
    """30,000 frames of 1400 bytes (42 MB) through a 16 MiB ring kept as a
    migration keeps it: no drop, and what is kept is the newest frames, in
    order, with none missing, a full history's worth: ``HISTORY`` blocks.
    (Counted in blocks, not bytes: a block the kernel hands over 4 ms after
    its first frame holds fewer, and a busy host pauses the sender that
    long; fresh-ci on dd95e61 kept 2,450 frames of 1400 bytes, where full
    blocks hold 2,457 in 15.)"""
    shadow = ShadowRing("tap0")
    try:
        _send_through(tap, 0, 30_000, 1400, keep=shadow)
        got = _numbers(shadow)
        assert shadow.dropped == 0
        assert got == list(range(30_000 - len(got), 30_000))
        assert shadow.kept_blocks >= ShadowRing.HISTORY
        assert len(got) >= ShadowRing.HISTORY * 10  # (4 ms of a sender that runs at all)
    finally:
        shadow.close()


def test_shadow_ring_keeps_a_tap_rings_worth_of_frames_at_a_low_pace(tap: int) -> None:
    """100 frames every 5 ms: the kernel hands a block over 4 ms after its
    first frame, so each holds about 100, and ``HISTORY`` blocks would be
    only some 1,600 frames (64 ms), less than a tap ring a reader that holds
    a frame leaves behind it.  The ring keeps ``KEEP_FRAMES`` (or all it may
    keep, ``MAX_KEPT`` blocks), the newest, in order, none missing."""
    shadow = ShadowRing("tap0")
    try:
        for start in range(0, 4000, 100):
            _send_through(tap, start, 100, 1400, keep=shadow)
            time.sleep(0.005)
        got = _numbers(shadow)
        assert shadow.dropped == 0
        assert got == list(range(4000 - len(got), 4000))
        assert len(got) >= ShadowRing.KEEP_FRAMES or shadow.kept_blocks >= ShadowRing.MAX_KEPT, \
            (len(got), shadow.kept_blocks)
    finally:
        shadow.close()


def test_a_shadow_ring_that_fell_behind_gives_only_what_follows_its_gap(tap: int) -> None:
    """Never kept, the ring fills and the kernel drops: nothing before the
    drops is trusted, and what comes after them, once kept again, is whole."""
    shadow = ShadowRing("tap0")
    try:
        _send_through(tap, 0, 15_000, 1400)  # more than 64 blocks of 256 KiB
        assert _numbers(shadow) == [] and shadow.dropped > 0
        dropped = shadow.dropped
        shadow.keep_recent()
        _send_through(tap, 15_000, 500, 1400, keep=shadow)
        assert _numbers(shadow) == list(range(15_000, 15_500))
        assert shadow.dropped == dropped
    finally:
        shadow.close()
