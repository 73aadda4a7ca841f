"""``netpass bench --live``: what netpass costs while the VM still runs.

Before the stop, the only per-frame work is the shadow ring's: the kernel
copies each frame sent toward the VM's tap into a mapped block, and netpass
hands whole blocks back as often as the pace needs (``ShadowRing.keep_all``).  This measures that for
real: in a namespace of its own, a "VM" process reads a tap as QEMU does, a
sender process offers frames to it at a fixed rate through the host's
transmit path (an AF_PACKET socket with the qdisc, so the frames pass the
taps AF_PACKET keeps, as frames from a bridge do), and this process keeps a
shadow ring on the tap exactly as a migration's live phase does.

Reported per offered rate:

* ``live_us_per_frame``: this process's CPU (user + system) over the run,
  per frame offered: what ``netpass migrate`` pays per frame before the stop;
* ``live_shadow_dropped``: frames the shadow could not copy (it fell behind);
* ``live_sender_extra_us_per_frame``: the sender's CPU per frame with the
  shadow less without it (alternate runs): the kernel's copy into the ring,
  paid by whoever sends toward the VM, not by netpass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import select
import subprocess
import sys
import time
from typing import Any

from . import links, netns, tapfd
from .bench import mixed_frames, quiet_namespace
from .errors import LabError
from .packet import ShadowRing, TxRing

TAP = "npl-vm"
HDR = 10
RATES = (50_000, 200_000)
TICK_S = 0.001  # the sender offers rate/1000 frames each millisecond


def _offer(rate: int, size: int) -> tuple[list[bytes], int]:
    """What the sender offers: a pool of frames, and how many of them a tick."""
    return mixed_frames(4096, size), max(1, rate // 1000)


def _tick(i: int, pool: list[bytes], per_tick: int) -> slice:
    """The frames of the pool tick ``i`` offers."""
    start = (i * per_tick) % (len(pool) - per_tick)
    return slice(start, start + per_tick)


def _sender(tap: str, rate: int, seconds: float, size: int) -> dict[str, Any]:
    """Offer ``rate`` frames a second to ``tap`` for ``seconds``: batches of a
    millisecond's frames on an absolute schedule (a late tick catches up, at
    most one tick's worth more at once)."""
    frames, per_tick = _offer(rate, size)
    pool = [bytes(HDR) + f for f in frames]
    ring = TxRing(tap, bypass=False)
    sent = refused = 0
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        ticks = int(seconds / TICK_S)
        for i in range(ticks):
            due = t0 + i * TICK_S
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            part = _tick(i, pool, per_tick)
            k = ring.send(pool, part.start, part.stop)
            sent += k
            refused += per_tick - k
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
    finally:
        ring.close()
    return {"sent": sent, "refused": refused, "seconds": elapsed, "cpu_s": cpu, "ticks": ticks}


def _offered_tail(size: int, rate: int, ticks: int, count: int) -> list[bytes]:
    """The last ``count`` frames :func:`_sender` offered (all of them taken)."""
    pool, per_tick = _offer(rate, size)
    out: list[bytes] = []
    for i in range(ticks - 1, -1, -1):
        out[:0] = pool[_tick(i, pool, per_tick)]
        if len(out) >= count:
            break
    return out[len(out) - count:] if count else []


def _vm(tap: str, seconds: float) -> dict[str, Any]:
    """The VM: read the tap (as QEMU's tap backend: one buffer, read after
    read) until ``seconds`` passed or stdin closed."""
    fd = tapfd.open_tap(tap, vnet_hdr=True)
    os.set_blocking(fd, False)
    links.set_up(None, tap)
    print("ready", flush=True)
    buf = bytearray(65_600)
    n = 0
    deadline = time.monotonic() + seconds
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(sys.stdin.fileno(), select.POLLIN)
    while time.monotonic() < deadline:
        events = dict(poller.poll(100))
        if sys.stdin.fileno() in events:
            break
        try:
            while True:
                os.readv(fd, [buf])
                n += 1
        except BlockingIOError:
            pass
    os.close(fd)
    return {"read": n}


async def _keep(rings: list[ShadowRing], sender: subprocess.Popen[str]) -> None:
    """The live phase's upkeep, as a migration runs it, until the sender is done."""
    while sender.poll() is None:
        await asyncio.sleep(ShadowRing.keep_all(rings))


def _one(rate: int, seconds: float, size: int, shadow: bool) -> dict[str, Any]:
    argv = [sys.executable, "-m", "netpass.livebench", "--send", TAP, str(rate), str(seconds), str(size)]
    rings = [ShadowRing(TAP)] if shadow else []
    try:
        sender = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        cpu0 = time.process_time()  # (after the fork: that is the bench's cost, not netpass's)
        try:
            asyncio.run(_keep(rings, sender))
            out, _ = sender.communicate(timeout=seconds + 30)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
        cpu = time.process_time() - cpu0
        time.sleep(2 * ShadowRing.RETIRE_MS / 1000 + 0.005)  # the last block handed over
        kept = [bytes(data) for ring in rings for _vnet, data in ring.frames()]
        dropped = sum(ring.dropped for ring in rings)
    finally:
        for ring in rings:
            ring.close()
    if sender.returncode != 0:
        raise LabError(f"the live bench's sender failed (exit {sender.returncode})")
    res: dict[str, Any] = json.loads(out)
    res.update(netpass_cpu_s=cpu, shadow_dropped=dropped)
    if shadow:
        # The bench is right only if the shadow kept what was offered: the
        # newest frames, in order, none missing.
        res["tail_ok"] = bool(kept) and not res["refused"] and \
            kept == _offered_tail(size, rate, res["ticks"], len(kept))
        res["kept"] = len(kept)
    return res


def run(size: int = 64, seconds: float = 2.0, rates: tuple[int, ...] = RATES) -> dict[str, Any]:
    """Each rate twice, with the shadow and without (alternating), in a
    namespace of its own that is always removed."""
    if not 60 <= size <= 1514:
        raise LabError("--size is a frame size in bytes, 60 to 1514")
    if not 0.2 <= seconds <= 60:
        raise LabError("--seconds is 0.2 to 60 with --live")
    ns = f"nplive-{os.getpid()}-{secrets.token_hex(2)}"
    netns.create(ns)
    vm = None
    out: dict[str, Any] = {"size": size, "seconds": seconds}
    try:
        with netns.entered(ns):
            quiet_namespace()  # no kernel chatter among the bench's frames
            vm = subprocess.Popen([sys.executable, "-m", "netpass.livebench", "--vm", TAP,
                                   str(seconds * 2 * len(rates) + 60)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert vm.stdout is not None
            if vm.stdout.readline().strip() != "ready":
                raise LabError("the live bench's VM did not start")
            for rate in rates:
                bare = _one(rate, seconds, size, shadow=False)
                kept = _one(rate, seconds, size, shadow=True)
                key = f"{rate // 1000}k"
                out[f"live_offered_fps_{key}"] = round(kept["sent"] / kept["seconds"])
                out[f"live_us_per_frame_{key}"] = round(kept["netpass_cpu_s"] / max(1, kept["sent"]) * 1e6, 3)
                out[f"live_shadow_dropped_{key}"] = kept["shadow_dropped"]
                out[f"live_sender_extra_us_per_frame_{key}"] = round(
                    (kept["cpu_s"] / max(1, kept["sent"]) - bare["cpu_s"] / max(1, bare["sent"])) * 1e6, 3)
                out[f"live_refused_{key}"] = kept["refused"]
                out[f"live_shadow_kept_{key}"] = kept["kept"]
                out[f"live_shadow_tail_ok_{key}"] = kept["tail_ok"]
            vm.communicate(input="", timeout=30)
    finally:
        if vm is not None and vm.poll() is None:
            vm.kill()
            vm.wait()
        netns.remove(ns)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netpass.livebench")
    p.add_argument("--send", nargs=4, metavar=("TAP", "RATE", "SECONDS", "SIZE"))
    p.add_argument("--vm", nargs=2, metavar=("TAP", "SECONDS"))
    args = p.parse_args(argv)
    if args.send:
        tap, rate, seconds, size = args.send
        print(json.dumps(_sender(tap, int(rate), float(seconds), int(size))))
    elif args.vm:
        print(json.dumps(_vm(args.vm[0], float(args.vm[1]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
