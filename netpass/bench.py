"""``netpass bench``: the real datapath, without QEMU, measured.

A source tap's ring is filled with N frames; netpass drains it (tap fd
reads), batches, compresses (zstd), ships over the authenticated channel to a
receiver in a second namespace, which decodes and replays into a destination
tap (AF_PACKET, as the agent does); a sink reading that tap counts.  The same
run times a bare read loop on a tap of the same kind, as the ceiling.

Frames carry their drain time (CLOCK_MONOTONIC, shared by the two
processes) in the batch's per-frame timestamp, so the receiver measures the
drain-to-replay latency of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import secrets
import subprocess
import sys
import threading
import time
from typing import Any

from . import links, netns, tapfd, wire
from .channel import BATCH, CONTROL, Channel, connect, server_handshake
from .errors import LabError
from .packet import Injector, send_frames

PORT = 7412
VM_MAC = bytes.fromhex("525400123456")
SRC_IP, DST_IP = "198.18.200.1", "198.18.200.2"


def mixed_frames(n: int, size: int, seed: int = 1) -> list[bytes]:
    """Frames shaped like a VM's receive traffic: real Ethernet/IPv4/UDP or
    TCP headers toward one MAC from a few peers, payloads part text-like and
    part random, sizes around ``size``."""
    rnd = random.Random(seed)
    dst = VM_MAC
    peers = [bytes([2, 0, 0, 0, 0, i]) for i in range(1, 9)]
    words = [b"GET ", b"HTTP/1.1 ", b"200 OK", b"Content-Length: ", b"\r\n", b"netpass ", b"user=",
             b"{\"id\": ", b"\"value\": ", b"0123456789", b"abcdef"]
    out = []
    for i in range(n):
        length = max(64, min(size, int(rnd.gauss(size, size * 0.05)))) if size > 64 else 64
        proto = 6 if rnd.random() < 0.7 else 17
        ip = (b"\x45\x00" + (length - 14).to_bytes(2, "big") + rnd.randbytes(2) + b"\x40\x00\x40" +
              bytes([proto]) + b"\x00\x00" + bytes([198, 18, 0, 1 + i % 8]) + bytes([198, 18, 0, 10]))
        l4 = rnd.randbytes(4) + (rnd.randbytes(8) + b"\x50\x18\xff\xff\x00\x00\x00\x00"
                                  if proto == 6 else b"\x00\x00\x00\x00")
        head = dst + peers[i % len(peers)] + b"\x08\x00" + ip + l4
        body = bytearray()
        while len(head) + len(body) < length:
            body += rnd.choice(words) if rnd.random() < 0.6 else rnd.randbytes(8)
        out.append(bytes(head + body)[:length])
    return out


def _fill(tap: str, frames: list[bytes]) -> None:
    if send_frames(tap, frames) < len(frames):
        raise LabError(f"tap {tap} refused frames: its ring is smaller than {len(frames)}")


def _filled_tap(name: str, frames: list[bytes]) -> int:
    """A tap of ours whose ring holds ``frames``, queued toward its reader; its fd."""
    fd = tapfd.open_tap(name)
    os.set_blocking(fd, False)
    links.set_txqueuelen(None, name, len(frames) + 1024)  # our own idle tap: safe to resize
    links.set_up(None, name)
    _fill(name, frames)
    return fd


def raw_drain(frames: list[bytes]) -> float:
    """Frames per second of a bare read loop on a filled tap (the ceiling)."""
    fd = _filled_tap("npb-raw", frames)
    try:
        read = os.read
        n = 0
        t0 = time.perf_counter()
        while n < len(frames):
            try:
                read(fd, 65536)
            except BlockingIOError:
                break
            n += 1  # (a frame or two of kernel chatter may be among them: same cost)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return n / dt if dt > 0 else 0.0


async def _send(frames: list[bytes], token: bytes, batch_frames: int) -> dict[str, Any]:
    fd = _filled_tap("npb-src", frames)
    try:
        ch = await connect(f"{DST_IP}:{PORT}", token)
        raw_bytes = 0
        seq = 0
        read = os.read
        t0 = time.perf_counter()
        batch: list[wire.Frame] = []
        n = 0
        while n < len(frames):
            try:
                data = read(fd, 65536)
            except BlockingIOError:
                break
            if data[:6] != VM_MAC:
                continue  # the kernel's own chatter on a tap that just came up
            n += 1
            raw_bytes += len(data)
            batch.append(wire.Frame(0, b"", data, time.monotonic_ns() // 1000))
            if len(batch) >= batch_frames:
                await ch.send(BATCH, wire.encode(seq, batch))
                seq, batch = seq + 1, []
        if batch:
            await ch.send(BATCH, wire.encode(seq, batch))
        await ch.send_json(CONTROL, {"op": "end", "frames": n})
        report = await ch.recv_json(CONTROL, timeout=120)
        dt = time.perf_counter() - t0
        wire_bytes = ch.bytes_out
        await ch.close()
    finally:
        os.close(fd)
    return {"frames": n, "seconds": dt, "raw_bytes": raw_bytes, "wire_bytes": wire_bytes, "receiver": report}


async def _serve(token: bytes, ready: str) -> None:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = Channel(reader, writer, peer="bench")
        await server_handshake(ch, token)
        fd = tapfd.open_tap("npb-dst")
        os.set_blocking(fd, True)
        links.set_up(None, "npb-dst")
        inj = Injector("npb-dst", vnet_hdr=False)
        sunk = [0]
        stop = threading.Event()

        def sink() -> None:  # the 'VM': reads the destination tap, counts the bench's frames
            while not stop.is_set():
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    return
                if data[:6] == VM_MAC:
                    sunk[0] += 1

        t = threading.Thread(target=sink, daemon=True)
        t.start()
        lat: list[int] = []
        retries = 0
        expected = None
        while True:
            mtype, payload = await ch.recv(timeout=120)
            if mtype == BATCH:
                for f in wire.decode(payload).frames:
                    while not inj.send(b"", f.data):  # a full ring: let the sink read
                        retries += 1
                        await asyncio.sleep(0)
                    # The batch keeps 32 bits of microseconds: difference modulo 2^32.
                    lat.append((time.monotonic_ns() // 1000 - f.ts_us) & 0xFFFFFFFF)
                continue
            expected = int(json.loads(payload)["frames"])
            break
        deadline = time.monotonic() + 5
        while sunk[0] < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        lat.sort()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        await ch.send_json(CONTROL, {"sunk": sunk[0], "ring_full_retries": retries,
                                     "latency_p50_ms": lat[len(lat) // 2] / 1000 if lat else None,
                                     "latency_p99_ms": lat[int(len(lat) * 0.99)] / 1000 if lat else None,
                                     "peak_rss_mib": round(rss, 1)})
        stop.set()
        os.close(fd)
        inj.close()
        await ch.close()
        done.set_result(None)

    server = await asyncio.start_server(handle, DST_IP, PORT)
    with open(ready, "w") as fh:
        fh.write("ready")
    async with server:
        await asyncio.wait_for(done, 600)


def run(size: int, count: int, batch_frames: int = 512) -> dict[str, Any]:
    if size < 60 or size > 1514:
        raise LabError("--size is a frame size in bytes, 60 to 1514")
    tag = secrets.token_hex(2)
    a, b = f"npbench-{os.getpid()}-{tag}-a", f"npbench-{os.getpid()}-{tag}-b"
    token = secrets.token_hex(32).encode()
    frames = mixed_frames(count, size)
    netns.create(a)
    netns.create(b)
    recv = None
    try:
        links.add_veth(a, "npb-a", b, "npb-b")
        links.add_address(a, "npb-a", SRC_IP, 24)
        links.add_address(b, "npb-b", DST_IP, 24)
        ready = f"/run/{b}.ready"
        tokfile = f"/run/{b}.token"
        with open(os.open(tokfile, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
            fh.write(token)
        recv = subprocess.Popen(
            netns.exec_argv(b, [sys.executable, "-m", "netpass.bench", "--serve", tokfile, ready]))
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if recv.poll() is not None or time.monotonic() > deadline:
                raise LabError("the bench receiver did not start")
            time.sleep(0.02)
        with netns.entered(a):
            raw = raw_drain(frames)
            res = asyncio.run(_send(frames, token, batch_frames))
        recv.wait(60)
    finally:
        if recv is not None and recv.poll() is None:
            recv.kill()
            recv.wait()
        for path in (f"/run/{b}.ready", f"/run/{b}.token"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        netns.remove(a)
        netns.remove(b)
    r = res["receiver"]
    fps = res["frames"] / res["seconds"]
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "size": size, "frames": res["frames"], "frames_sunk": r["sunk"],
        "frames_per_second": round(fps), "gbit_per_second": round(res["raw_bytes"] * 8 / res["seconds"] / 1e9, 3),
        "raw_drain_fps": round(raw), "ratio_to_raw": round(fps / raw, 3) if raw else None,
        "peak_rss_mib": round(max(rss_self, r["peak_rss_mib"]), 1),
        "compression_ratio": round(res["raw_bytes"] / res["wire_bytes"], 2) if res["wire_bytes"] else None,
        "latency_p50_ms": r["latency_p50_ms"], "latency_p99_ms": r["latency_p99_ms"],
        "ring_full_retries": r["ring_full_retries"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netpass.bench")
    p.add_argument("--serve", nargs=2, metavar=("TOKEN_FILE", "READY_FILE"))
    args = p.parse_args(argv)
    with open(args.serve[0], "rb") as fh:
        token = fh.read()
    asyncio.run(_serve(token, args.serve[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
