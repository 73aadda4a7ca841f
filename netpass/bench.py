"""``netpass bench``: the real datapath, without QEMU, measured.

A source tap's ring is filled with N frames; netpass drains it (tap fd
reads), batches, compresses (zstd), ships over the authenticated channel to a
receiver in a second namespace, which decodes and replays into a destination
tap through an AF_PACKET TX ring, as the agent does; a sink process reading
that tap (the 'VM') counts.  The same run times a bare read loop on a tap of
the same kind, as the ceiling.  Every tap has a virtio-net header, as
QEMU's do.

Each batch carries its drain time (CLOCK_MONOTONIC, shared by the
processes) in the per-frame timestamp, so the receiver measures the
drain-to-replay latency of each frame.  The end-to-end rate runs from the
first drain to the sink's last frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import select
import statistics
import subprocess
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import links, netns, tapfd, tc, wire
from .channel import BATCH, CONTROL, Channel, Wire, connect, serve, server_handshake
from .errors import LabError
from .packet import Shadow, TxRing, send_frames

if TYPE_CHECKING:
    from .agent import DestSession
    from .deststate import DestNic

PORT = 7412
VM_MAC = bytes.fromhex("525400123456")
VM_MAC_TEXT = ":".join(f"{b:02x}" for b in VM_MAC)
SRC_IP, DST_IP = "198.18.200.1", "198.18.200.2"
HDR = wire.VNET_HDR_LEN
DST_QLEN = 4096  # the destination tap's ring (a busy VM's tap; libvirt's default is 1000)
MAX_FRAMES = 500_000
SESSION_FRAMES = 20_000  # frames the capture-path measure runs on


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


def _cpu() -> float:
    """CPU seconds (user + system) this process used so far (clock_gettime,
    not os.times: its 10 ms ticks are 0.5 us per frame over 20,000 frames)."""
    return time.process_time()


def quiet_namespace() -> None:
    """No IPv6 on taps made from now on in this namespace: the kernel's own
    chatter (router solicitations) would otherwise join the bench's frames."""
    with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as fh:
        fh.write("1")


def _filled_tap(name: str, frames: list[bytes]) -> int:
    """A tap of ours whose ring holds ``frames``, queued toward its reader; its fd."""
    fd = tapfd.open_tap(name, vnet_hdr=True)
    os.set_blocking(fd, False)
    links.set_txqueuelen(None, name, len(frames) + 1024)  # our own idle tap: safe to resize
    links.set_up(None, name)
    if send_frames(name, frames) < len(frames):
        raise LabError(f"tap {name} refused frames: its ring is smaller than {len(frames)}")
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
                read(fd, 65_600)
            except BlockingIOError:
                break
            n += 1
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return n / dt if dt > 0 else 0.0


class _NoLink:
    """A channel that takes batches and sends nothing: the capture path alone."""

    bytes_out = 0
    link_rate = peer_limited = None

    def should_compress(self, mode: str, raw_bytes: int) -> bool:
        return False

    def compressed(self, raw_bytes: int, packed_bytes: int, seconds: float) -> None:
        pass

    async def send(self, mtype: int, payload: bytes | bytearray) -> None:
        self.bytes_out += len(payload)


class _FilledTap:
    """A tap the host filled, read as ``netpass migrate`` reads its parking tap."""

    name = "npb-ses"
    parked = True

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, limit: int = 256) -> list[bytes]:
        return tapfd.drain(self.fd, limit)

    def dropped(self) -> int:
        return 0


async def session_capture(frames: list[bytes]) -> float:
    """CPU microseconds per frame of ``netpass migrate``'s own capture path
    after the park, which the bench's drain loop leaves out: each parking
    tap read checked (none of the VM's own, none of netpass's), cached for
    a give-back and batched (``SourceSession.capture_now``,
    ``ship_pending``).  The tap is filled through the host's transmit path,
    as the parking steering fills it."""
    from .nics import Nic
    from .source import SourceSession
    from .srcship import Shipper
    from .srcstate import MigrateOptions, SourceNic

    frames = frames[:SESSION_FRAMES]
    tap = _FilledTap.name
    fd = tapfd.open_tap(tap, vnet_hdr=True)
    ring = None
    try:
        os.set_blocking(fd, False)
        links.set_txqueuelen(None, tap, len(frames) + 1024)
        links.set_up(None, tap)
        ring = TxRing(tap, bypass=False)
        recs = [bytes(HDR) + f for f in frames]
        sent = 0
        while sent < len(recs):
            k = ring.send(recs, sent)
            if not k:
                raise LabError(f"tap {tap} refused frames while it was being filled")
            sent += k
        opts = MigrateOptions(qmp="-", uri="-", dest_agent="-", dest_qmp="-", token=b"-", max_cache_bytes=1 << 40)
        sess = SourceSession(opts)
        sess.shipper = Shipper(sess, _NoLink())
        sn = SourceNic(index=0, nic=Nic(mac=VM_MAC_TEXT, tap=tap), fds=[fd],
                       hdr_size=HDR, mac_bytes=VM_MAC, park=_FilledTap(fd), inject=None)  # type: ignore[arg-type]
        sess.nics.append(sn)
        cpu0 = _cpu()
        sess.capture_now()
        await sess.ship_pending()
        cpu = _cpu() - cpu0
    finally:
        if ring is not None:
            ring.close()
        os.close(fd)
    if sn.captured != len(frames) or sess.notes:
        raise LabError(f"the capture path took {sn.captured} of {len(frames)} frames: {sess.notes}")
    return cpu / len(frames) * 1e6


def perf_hint(path: str) -> str:
    """How to give ``--perf-control`` a FIFO perf reads."""
    return f"make it with mkfifo and run the bench under perf record -D -1 --control=fifo:{path}"


def perf_control(path: str | None, command: str) -> None:
    """Tell a ``perf record --control=fifo:PATH`` (or ``perf stat``) to
    ``enable`` or ``disable`` its counting: the bench profiles the transfer
    alone, not the frames' making nor the namespaces' set-up."""
    if path is None:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise LabError(f"--perf-control {path}: no perf reads it ({exc.strerror}); {perf_hint(path)}") from exc
    try:
        os.write(fd, f"{command}\n".encode())
    finally:
        os.close(fd)


def _batches(fd: int, count: int, batch_frames: int, compress: str, ch: Channel,
             seq: int = 0) -> Iterator[tuple[int, int, bytes | bytearray, bool]]:
    """Drain the tap, each batch encoded as ``netpass migrate`` encodes it:
    (frames, their bytes without headers, the batch, compressed)."""
    n = 0
    while n < count:
        bufs = tapfd.drain(fd, batch_frames)
        if not bufs:
            return
        n += len(bufs)
        size = sum(map(len, bufs))
        zstd = ch.should_compress(compress, size)
        t = time.perf_counter()
        blob = wire.encode_records(seq, bufs, 0, HDR, time.monotonic_ns() // 1000, compress=zstd)
        if zstd:
            ch.compressed(size, len(blob), time.perf_counter() - t)
        yield len(bufs), size - HDR * len(bufs), blob, zstd
        seq += 1


async def _send(frames: list[bytes], token: bytes, batch_frames: int, compress: str,
                perf: str | None = None, free_source: bool = False) -> dict[str, Any]:
    """The source's half: drain, batch, compress, ship, with the calls ``netpass
    migrate`` makes for them; its capture path's extra work (the shadow, the
    alignment, the rollback cache) is measured apart, by :func:`session_capture`.
    With ``free_source`` every batch is drained and encoded before the clock
    starts, and the clock times the rest alone: the ceiling any source,
    however cheap its capture, could reach with this channel, receiver and VM."""
    fd = _filled_tap("npb-src", frames)
    try:
        ch = await connect(f"{DST_IP}:{PORT}", token)
        # The clock starts once the receiver's session is set up, as a
        # migration's switchover comes after the agent's prepare.
        ready = await ch.recv_json(CONTROL, timeout=60)
        if ready.get("op") != "ready":
            raise LabError(f"the bench receiver sent {ready!r} instead of 'ready'")
        raw_bytes = seq = n = compressed = 0
        made = _batches(fd, len(frames), batch_frames, compress, ch)
        if free_source:
            # Stamped now: the latency then counts the time they waited, not
            # only their way across.
            made = iter(list(made))
        perf_control(perf, "enable")
        cpu0 = _cpu()
        t0 = time.monotonic()
        for k, raw, blob, zstd in made:
            n += k
            raw_bytes += raw
            compressed += zstd
            await ch.send(BATCH, blob)
            seq += 1
        t_drained = time.monotonic()
        cpu = _cpu() - cpu0
        await ch.send_json(CONTROL, {"op": "end", "frames": n})
        report = await ch.recv_json(CONTROL, timeout=120)
        perf_control(perf, "disable")
        wire_bytes = ch.bytes_out
        await ch.close()
    finally:
        os.close(fd)
    link = ch.link_rate
    peer = ch.peer_limited
    return {"frames": n, "cpu_s": cpu, "batches": seq, "compressed": compressed,
            "link_mbit": round(link * 8 / 1e6, 1) if link else None,
            "peer_limited": round(peer, 2) if peer is not None else None, "t0": t0,
            "drain_s": t_drained - t0, "raw_bytes": raw_bytes, "wire_bytes": wire_bytes, "receiver": report}


def _sink(fd: int, expect: int, ready_fd: int, out_fd: int, verify: bool) -> None:
    """The 'VM': read the destination tap until ``expect`` bench frames came
    (or 120 s passed); report the count, the time of the last and, with
    ``verify``, a CRC over all of them in arrival order.  Like QEMU's tap
    backend, it reads each frame into one buffer it keeps (``readinto``),
    not into a new object per frame."""
    os.write(ready_fd, b"1")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    tap = open(fd, "rb", buffering=0, closefd=False)
    readinto = tap.readinto
    buf = bytearray(65_600)
    view = memoryview(buf)
    mac = slice(HDR, HDR + 6)
    got, crc, last, cpu0 = 0, 0, 0.0, 0.0
    deadline = time.monotonic() + 120
    while got < expect and time.monotonic() < deadline:
        before, reads = got, 0
        while reads < 1024:
            n = readinto(buf)  # None: the ring is empty
            if n is None:
                break
            reads += 1
            if buf[mac] == VM_MAC:
                got += 1
                if verify:
                    crc = zlib.crc32(view[HDR:n], crc)
        if not reads:
            poller.poll(50)
            continue
        last = time.monotonic()
        if not before:
            cpu0 = _cpu()
    os.write(out_fd, json.dumps({"sunk": got, "t_last": last, "crc": crc, "sink_cpu_s": _cpu() - cpu0}).encode())


def _percentile(weighted: list[tuple[int, int]], q: float) -> float | None:
    """The q-quantile in milliseconds of values given with their counts."""
    total = sum(n for _, n in weighted)
    if not total:
        return None
    rank, seen = min(int(total * q), total - 1), 0
    ordered = sorted(weighted)
    for value, n in ordered:
        seen += n
        if seen > rank:
            return value / 1000
    return ordered[-1][0] / 1000


class _TimedRing:
    """The destination's TX ring, noting when each batch's frames went in:
    the agent's feeder calls it, the bench learns drain-to-replay times."""

    def __init__(self, ring: TxRing) -> None:
        self.ring = ring
        self.queue: deque[list[int]] = deque()  # [the source's stamp, frames of it still to go]
        self.lat: list[tuple[int, int]] = []  # (drain-to-replay microseconds, frames)

    def send_span(self, body: memoryview, offsets: Any, start: int, end: int) -> int:
        k = self.ring.send_span(body, offsets, start, end)
        now = time.monotonic_ns() // 1000
        left = k
        while left and self.queue:
            head = self.queue[0]
            n = min(left, head[1])
            # The batch keeps 32 bits of microseconds: difference modulo 2^32.
            self.lat.append(((now - head[0]) & 0xFFFFFFFF, n))
            head[1] -= n
            left -= n
            if not head[1]:
                self.queue.popleft()
        return k

    def close(self) -> None:
        self.ring.close()


def _fork_sink(fd: int, expect: int, verify: bool) -> tuple[int, int]:
    """The sink, a forked process that reads the tap as the VM's QEMU would
    (nothing of asyncio runs in it), ready; its pid and the pipe its
    results come on."""
    rd, wr = os.pipe()
    ready_r, ready_w = os.pipe()
    sink_pid = os.fork()
    if sink_pid == 0:
        os.close(rd)
        try:
            _sink(fd, expect, ready_w, wr, verify)
        finally:
            os._exit(0)
    os.close(wr)
    os.read(ready_r, 1)
    return sink_pid, rd


def _session(ch: Channel, token: bytes, tap: str, fd: int, ring: _TimedRing) -> tuple[DestSession, DestNic]:
    """The agent's own session over the bench's tap, its VM running."""
    from .agent import DestSession
    from .deststate import AgentConfig, DestNic
    from .nics import Nic

    cfg = AgentConfig(listen=f"{DST_IP}:{PORT}", token=token, qmp_root=Path("/nonexistent"))
    sess = DestSession(cfg, ch, "bench")
    sess.replay.to_source = False
    dn = DestNic(nic=Nic(mac=VM_MAC_TEXT, tap=tap),
                 ring=ring, fds=[fd], orig_qlen=DST_QLEN, mac_bytes=VM_MAC,  # type: ignore[arg-type]
                 shadow=Shadow(tap, keep=100_000))
    dn.mark_tx = dn.tx0 = links.tx_packets(tap)
    sess.nics.append(dn)
    sess.running = True  # the 'VM' reads from the start
    return sess, dn


def _receiver_fields(cpu_s: float, ring: _TimedRing, dn: DestNic) -> dict[str, Any]:
    return {"receiver_cpu_s": cpu_s, "latency_p50_ms": _percentile(ring.lat, 0.5),
            "latency_p99_ms": _percentile(ring.lat, 0.99), "frames_dropped": dn.dropped,
            "peak_rss_mib": round(_rss_mib("VmHWM"), 1)}


async def _serve(token: bytes, ready: str, expect: int, verify: bool) -> None:
    """The destination: the agent's own DestSession accepts each batch and
    its feeder replays the cache into the tap, as during a migration; a
    forked sink reads the tap as the VM's QEMU would."""
    from . import agent, heap  # noqa: F401  (the agent's modules load at its start, not per session)

    heap.keep_freed()  # as the agent does (Agent.start)
    tap = "npb-dst"
    fd = tapfd.open_tap(tap, vnet_hdr=True)  # the sink's, as a QEMU's; the agent polls it too
    links.set_txqueuelen(None, tap, DST_QLEN)
    links.set_up(None, tap)
    os.set_blocking(fd, False)
    sink_pid, rd = _fork_sink(fd, expect, verify)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle(reader: Wire, writer: Any) -> None:
        ch = Channel(reader, writer, peer="bench")
        await server_handshake(ch, token)
        ring = _TimedRing(TxRing(tap, vnet_hdr=True))
        sess, dn = _session(ch, token, tap, fd, ring)
        feeder = asyncio.get_running_loop().create_task(sess.feed_loop())
        await ch.send_json(CONTROL, {"op": "ready"})
        cpu0 = None
        try:
            while True:
                mtype, payload = await ch.recv(timeout=120)
                if cpu0 is None:
                    cpu0 = _cpu()
                if mtype != BATCH:
                    break
                batch = wire.decode(payload, nic_count=len(sess.nics))
                if not len(batch):
                    continue
                # The source stamps each batch once: its frames share the stamp.
                entry = [batch.ts_us[0], len(batch)]
                ring.queue.append(entry)
                ack = sess.replay.accept_batch(batch)  # feeds the ring too
                entry[1] = max(0, entry[1] - (len(batch) - ack["accepted"]))
            while dn.pending:
                await asyncio.sleep(0.0005)
        finally:
            feeder.cancel()
        res = json.loads(await asyncio.to_thread(os.read, rd, 4096) or b"{}")
        await ch.send_json(CONTROL, {**res, **_receiver_fields(_cpu() - (cpu0 or 0.0), ring, dn)})
        ring.close()
        dn.shadow.close()  # type: ignore[union-attr]
        await ch.close()
        done.set_result(None)

    server = await serve(handle, DST_IP, PORT)
    with open(ready, "w") as fh:
        fh.write("ready")
    try:
        async with server:
            await asyncio.wait_for(done, 600)
    finally:
        os.waitpid(sink_pid, 0)


def run(size: int, count: int, batch_frames: int = 512, verify: bool = False,
        compress: str = "auto", link_mbit: int | None = None, perf: str | None = None,
        free_source: bool = False) -> dict[str, Any]:
    """Run the bench once; ``verify`` has the sink check every byte (slower);
    ``compress`` is the policy, as ``netpass migrate --compress``;
    ``link_mbit`` limits the link between the two hosts (a tbf); ``perf`` is
    a perf control FIFO, enabled for the transfer only (:func:`perf_control`);
    ``free_source`` drains and encodes before the clock (see :func:`_send`)."""
    if size < 60 or size > 1514:
        raise LabError("--size is a frame size in bytes, 60 to 1514")
    if not 1 <= count <= MAX_FRAMES:
        # The whole run sits in one tap's ring first; tun refuses a ring
        # longer than 2^19 (txqueuelen 524,289 gets EPERM here).
        raise LabError(f"--frames is 1 to {MAX_FRAMES:,} (the bench queues them all in one tap's ring)")
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
        if link_mbit:
            tc.shape(a, "npb-a", link_mbit * 1_000_000)
        ready = f"/run/{b}.ready"
        tokfile = f"/run/{b}.token"
        with open(os.open(tokfile, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
            fh.write(token)
        argv = [sys.executable, "-m", "netpass.bench", "--serve", tokfile, ready, "--expect", str(count)]
        recv = subprocess.Popen(netns.exec_argv(b, argv + (["--verify"] if verify else [])))
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if recv.poll() is not None or time.monotonic() > deadline:
                raise LabError("the bench receiver did not start")
            time.sleep(0.02)
        with netns.entered(a):
            quiet_namespace()
            raw = raw_drain(frames)
            session_us = asyncio.run(session_capture(frames))
            res = asyncio.run(_send(frames, token, batch_frames, compress, perf, free_source))
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
    out = _fields(res, raw, session_us, size, compress, link_mbit)
    out["free_source"] = free_source
    if verify:
        expect = 0
        for f in frames:
            expect = zlib.crc32(f, expect)
        out["content_ok"] = res["receiver"].get("crc") == expect
    return out

def _fields(res: dict[str, Any], raw: float, session_us: float, size: int, compress: str,
            link_mbit: int | None) -> dict[str, Any]:
    """The bench's fields, from what the source (``res``) and the receiver
    (``res["receiver"]``) measured."""
    r = res["receiver"]
    cpu_s = res["cpu_s"] + r["receiver_cpu_s"] + r["sink_cpu_s"]
    seconds = r["t_last"] - res["t0"] if r.get("t_last") else float("inf")
    fps = res["frames"] / seconds
    out = {
        "size": size, "compress": compress, "link_mbit": link_mbit, "frames": res["frames"],
        "frames_sunk": r.get("sunk"),
        "frames_per_second": round(fps), "gbit_per_second": round(res["raw_bytes"] * 8 / seconds / 1e9, 3),
        "raw_drain_fps": round(raw), "ratio_to_raw": round(fps / raw, 3) if raw else None,
        "drain_fps": round(res["frames"] / res["drain_s"]) if res["drain_s"] else None,
        "peak_rss_mib": r["peak_rss_mib"],
        "compression_ratio": round(res["raw_bytes"] / res["wire_bytes"], 2) if res["wire_bytes"] else None,
        "batches_compressed": f"{res['compressed']}/{res['batches']}",
        "link_rate_mbit": res["link_mbit"], "link_peer_limited": res["peer_limited"],
        "latency_p50_ms": r["latency_p50_ms"], "latency_p99_ms": r["latency_p99_ms"],
        "frames_dropped": r.get("frames_dropped"),
        # netpass migrate's own capture path, per frame on one core (see session_capture).
        "session_source_us_per_frame": round(session_us, 2),
        "session_source_fps": round(1e6 / session_us) if session_us else None,
        # CPU per frame of each process while it worked: where the cores go.
        "cpu_us_per_frame": {"source": round(res["cpu_s"] / res["frames"] * 1e6, 2),
                             "receiver": round(r["receiver_cpu_s"] / res["frames"] * 1e6, 2),
                             "sink": round(r["sink_cpu_s"] / res["frames"] * 1e6, 2),
                             "total": round(cpu_s / res["frames"] * 1e6, 2)},
        **cpu_bound(cpu_s / res["frames"], raw),
    }
    return out


def cpu_bound(cpu_s_per_frame: float, raw: float, cpus: int | None = None) -> dict[str, Any]:
    """What this machine's cores could carry at most with the CPU the run's
    three processes spent per frame, every core busy all the time:
    ``cpus / cpu_s_per_frame`` frames/s, and that as a ratio to the bare
    read loop.  The processes share the cores (on separate hosts each side
    has its own): ``ratio_to_raw`` gets closer to ``cpu_bound_ratio`` when
    they wait less on each other, and past it only when they spend less."""
    n = cpus if cpus is not None else len(os.sched_getaffinity(0))
    fps = n / cpu_s_per_frame if cpu_s_per_frame > 0 else None
    return {"cpus": n, "cpu_bound_fps": round(fps) if fps else None,
            "cpu_bound_ratio": round(fps / raw, 3) if fps and raw else None}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each field's median over runs of the bench (the machines are noisy:
    quote medians); nested numbers too; a field that is not a number is kept
    when every run agrees and listed when they differ."""
    out: dict[str, Any] = {}
    for key in runs[0] if runs else ():
        values: list[Any] = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            m = statistics.median(values)
            out[key] = round(m, 3) if isinstance(m, float) else m
        elif all(isinstance(v, dict) for v in values) and values[0] and \
                all(isinstance(x, (int, float)) for v in values for x in v.values()):
            out[key] = medians(values)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            out[key] = values
    return out


def _rss_mib(field: str = "VmRSS") -> float:
    """This process's resident size (``VmHWM``: its peak).  Not ru_maxrss,
    which survives exec and so reports the forking parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cache_fill(cap_mib: int, size: int) -> dict[str, Any]:
    """The agent's cache while the VM is still paused: batches arrive, nothing
    can be replayed yet, the cap must hold.  Runs the agent's own accept()."""

    from .destfeed import Replay
    from .deststate import AgentConfig, DestNic, DestState
    from .nics import Nic

    class PausedVm:  # a ring the VM has not started to read
        def send(self, records: list[bytes], start: int = 0, end: int | None = None) -> int:
            return 0

        def close(self) -> None:
            pass

    pool = mixed_frames(4096, size)
    cfg = AgentConfig(listen="127.0.0.1:1", token=b"x" * 32, qmp_root=Path("/nonexistent"),
                      max_cache_bytes=cap_mib << 20)
    sess = DestState(cfg, "bench")
    replay = Replay(sess, None, None)  # type: ignore[arg-type]  # (it never talks to a source here)
    sess.nics.append(DestNic(nic=Nic(mac=VM_MAC_TEXT, tap="none"), ring=PausedVm(),  # type: ignore[arg-type]
                             fds=[], orig_qlen=1000, mac_bytes=VM_MAC))
    base = _rss_mib()
    seq = offered = offered_bytes = 0
    while True:
        recs = [bytes(HDR) + f for f in pool[seq % 8 * 512:(seq % 8 + 1) * 512]]
        ack = replay.accept(wire.encode_records(seq, recs, 0, HDR, seq), feed=False)
        seq += 1
        offered += len(recs)
        offered_bytes += sum(map(len, recs))
        if ack["dropped"] == len(recs) and offered_bytes > (cap_mib << 20) * 1.1:
            break
    dn = sess.nics[0]
    peak = _rss_mib("VmHWM")
    cached = sess.cache_bytes
    bound = 1.5 * cached / 2**20 + 64
    return {"cache_cap_mib": cap_mib, "size": size, "frames_offered": offered,
            "frames_cached": len(dn.pending), "cached_mib": round(cached / 2**20, 1),
            "dropped_cache_full": dn.dropped.get("agent_cache_full", 0),
            "rss_before_mib": round(base, 1), "peak_rss_mib": round(peak, 1),
            "rss_bound_mib": round(bound, 1), "cap_holds": cached <= cap_mib << 20,
            "rss_within_bound": peak <= bound}


def cache_cap(cap_mib: int, size: int) -> dict[str, Any]:
    """Run :func:`_cache_fill` in a fresh process, so its peak RSS is its own."""
    out = subprocess.run([sys.executable, "-m", "netpass.bench", "--cache-fill", str(cap_mib), str(size)],
                         capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise LabError(f"the cache bench failed: {out.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netpass.bench")
    p.add_argument("--serve", nargs=2, metavar=("TOKEN_FILE", "READY_FILE"))
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--verify", action="store_true")
    p.add_argument("--cache-fill", nargs=2, type=int, metavar=("CAP_MIB", "SIZE"))
    args = p.parse_args(argv)
    if args.cache_fill:
        print(json.dumps(_cache_fill(*args.cache_fill)))
        return 0
    with open(args.serve[0], "rb") as fh:
        token = fh.read()
    quiet_namespace()
    asyncio.run(_serve(token, args.serve[1], args.expect, args.verify))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
