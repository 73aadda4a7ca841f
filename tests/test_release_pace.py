"""The strict-ordering release keeps to what the VM reads, on a real tap.

A slow 'VM' (this test reading the tap's fd at 3,000 frames/s) gets 2,000
held frames and more live ones while they are released.  The tap's ring is
small (256), the only buffer between the release and the VM: more than
the VM reads overflows it, and tun drops frames for good.  The agent's own
release (Holds.release_rx, destflow.py: windows the ring has room for)
must deliver every frame, in order, with the ring dropping none; a release
that does not look at the ring (windows of 20,000 frames) drops hundreds
(the teeth).

The rig runs under ``ip netns exec`` in a namespace of its own: the release
reads the tap's counters from sysfs, which shows a namespace's devices only
when mounted inside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from netpass import netns

VM = bytes.fromhex("020000000007")
PEER = bytes.fromhex("020000000009")
RING = 256
HELD = 2000
LIVE = 500  # more frames from the network while the release runs, at 1,000/s
READ_FPS = 3000


def frame(n: int) -> bytes:
    return VM + PEER + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(50)


def _rig(mode: str, state: Path) -> dict[str, Any]:
    """Inside the namespace: tap0, a closed hold with HELD frames, a slow
    reader; release by ``mode`` ('agent' or 'fixed'); what the 'VM' got."""
    from netpass import hold, links, tapfd
    from netpass.agent import DestSession
    from netpass.deststate import AgentConfig, DestNic
    from netpass.nics import Nic
    from netpass.packet import Injector, Shadow, TxRing

    fd = tapfd.open_tap("tap0", vnet_hdr=True)
    os.set_blocking(fd, False)
    links.set_txqueuelen(None, "tap0", RING)
    links.set_up(None, "tap0")
    h = hold.Hold.install("pace", "tap0", state, 8 << 20, 3000)
    net = Injector("tap0", vnet_hdr=False, bypass=False)  # through the tap's egress: held
    got: list[int] = []
    stop = threading.Event()

    def vm() -> None:
        """Read at most READ_FPS, in 10 ms rounds, as a slow guest would."""
        end = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < end:
            for _ in range(READ_FPS // 100):
                try:
                    data = os.read(fd, 4096)[10:]
                except BlockingIOError:
                    break
                if data[6:12] == PEER:
                    got.append(int.from_bytes(data[14:18], "big"))
            time.sleep(0.01)

    def network() -> None:
        for n in range(HELD + 1, HELD + LIVE + 1):
            net.send(b"", frame(n))
            time.sleep(0.001)

    try:
        h.close()
        for n in range(1, HELD + 1):
            net.send(b"", frame(n))
        time.sleep(0.2)
        dropped0 = links.tx_dropped("tap0")
        reader = threading.Thread(target=vm)
        sender = threading.Thread(target=network)
        reader.start()
        sender.start()
        try:
            if mode == "fixed":
                h.release_all(20_000, 10)
            else:
                cfg = AgentConfig(listen="127.0.0.1:1", token=b"x" * 32, qmp_root=Path("/nonexistent"))
                sess = DestSession(cfg, None, "pace")  # type: ignore[arg-type]
                dn = DestNic(nic=Nic(mac=VM.hex(":"), tap="tap0"), ring=TxRing("tap0"),
                             fds=[fd], orig_qlen=RING, mac_bytes=VM, shadow=Shadow("tap0", keep=100_000))
                dn.mark_tx = dn.tx0 = links.tx_packets("tap0")
                dn.hold = h
                sess.nics.append(dn)
                sess.strict = sess.hold_closed = sess.running = True
                sess.hold_timeout_ms = 3000
                # As after a replay of 1,000 frames the VM took in 50 ms.
                sess.resume_t = time.monotonic()
                sess.last_consumed_t = sess.resume_t + 0.05
                dn.replayed = 1000
                asyncio.run(sess.holds.release_rx(time.monotonic() + 10))
        finally:
            sender.join()
            quiet = time.monotonic()
            while time.monotonic() - quiet < 0.3 and time.monotonic() < quiet + 15:
                n = len(got)
                time.sleep(0.05)
                if len(got) != n:
                    quiet = time.monotonic()
            stop.set()
            reader.join()
        want = list(range(1, HELD + LIVE + 1))
        return {"in_order": got == want, "got": len(got), "missing": len(set(want) - set(got)),
                "ring_dropped": links.tx_dropped("tap0") - dropped0, "held_rx": h.stats.held_rx,
                "hold_dropped": h.stats.dropped_rx}
    finally:
        h.remove(vm_running=False)
        net.close()
        os.close(fd)


def run_rig(mode: str, tmp: Path) -> dict[str, Any]:
    ns = f"nptest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    try:
        proc = subprocess.run(netns.exec_argv(ns, [sys.executable, __file__, mode, str(tmp / "holds")]),
                              capture_output=True, text=True, timeout=120)
    finally:
        netns.remove(ns)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_release_keeps_to_what_a_slow_vm_reads(root_required: None, tmp_path: Path) -> None:
    res = run_rig("agent", tmp_path)
    assert res["held_rx"] >= HELD and res["hold_dropped"] == 0, res
    assert res["ring_dropped"] == 0 and res["in_order"], res


def test_a_fixed_fast_release_overflows_the_ring(root_required: None, tmp_path: Path) -> None:
    """The teeth: the rig sees what a release above the VM's reading does."""
    res = run_rig("fixed", tmp_path)
    assert res["ring_dropped"] >= 100 and res["missing"] >= 100, res


if __name__ == "__main__":
    print(json.dumps(_rig(sys.argv[1], Path(sys.argv[2]))))
