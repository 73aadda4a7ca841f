"""A paced prober: sends numbered probes to the guest and matches the replies.

Every probe carries its own 64-bit id and send time in the payload, so loss
and reordering are read from the replies, never inferred from timing.

ICMP mode sends echo requests.  UDP mode sends datagrams to a closed port;
the guest kernel answers each with ICMP port-unreachable, which quotes the
datagram, id included.

Run it inside the peer namespace as ``python -m netpass.lab.prober``.  It
stops at ``--duration`` or when its standard input closes, whichever comes
first, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

MAGIC = 0x6E7470726F626531  # "ntprobe1"
PAYLOAD = struct.Struct("!QQQ")  # magic, probe id, send time (CLOCK_MONOTONIC ns)
PAYLOAD_LEN = 56  # a 98-byte frame
HEADERS = 14 + 20 + 8  # Ethernet, IPv4, ICMP echo (or UDP) header
MAX_FRAME = 1514
UDP_PORT = 9
MAX_RATE = 100_000
MAX_DURATION = 600.0
SO_RCVBUFFORCE = 33


MAX_LOST_RUNS = 500
MAX_REORDERS = 200


@dataclass
class ProbeStats:
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    first_duplicate_id: int | None = None
    reordered: int = 0
    first_reordered_id: int | None = None  # the first reply that came after a later one
    first_reordered_rx_ms: float | None = None  # when it came, from the first probe's send
    # Each reply that came after a later one: [id, received (ns), highest id
    # received before it]; the first MAX_REORDERS of them.
    reorders: list[list[int]] = field(default_factory=list)
    gap_ms: float = 0.0
    max_burst_lost: int = 0
    first_lost_id: int | None = None
    last_lost_id: int | None = None
    last_lost_sent_ns: int | None = None  # when that probe went (monotonic clock, ns)
    first_lost_sent_ns: int | None = None  # when the first lost one went
    # Each run of consecutive lost probes: [first sent, last sent (ns), count];
    # the first MAX_LOST_RUNS of them.
    lost_runs: list[list[int]] = field(default_factory=list)
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    rate: float = 0.0
    proto: str = "icmp"
    socket_drops: int = 0
    start_ns: int = 0
    timeline: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("timeline")
        return out


def set_at_stdin_end(event: threading.Event) -> None:
    """Set ``event`` once stdin ends (the lab closes it to stop a traffic
    program early), from a daemon thread."""
    def watch() -> None:
        try:
            sys.stdin.buffer.read()
        except (OSError, ValueError):
            pass
        event.set()
    threading.Thread(target=watch, daemon=True).start()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def analyse(send_ns: list[int], replies: list[tuple[int, int]], rate: float = 0.0,
            proto: str = "icmp") -> ProbeStats:
    """Turn send times (indexed by probe id) and (id, receive ns) replies into stats."""
    st = ProbeStats(sent=len(send_ns), rate=rate, proto=proto,
                    start_ns=send_ns[0] if send_ns else 0)
    seen: set[int] = set()
    highest = -1
    latencies: list[float] = []
    prev_rx: int | None = None
    for pid, rx in replies:
        if pid < 0 or pid >= len(send_ns):
            continue
        if pid in seen:
            st.duplicates += 1
            if st.first_duplicate_id is None:
                st.first_duplicate_id = pid
            continue
        seen.add(pid)
        if pid < highest:
            st.reordered += 1
            if st.first_reordered_id is None:
                st.first_reordered_id = pid
                st.first_reordered_rx_ms = round((rx - st.start_ns) / 1e6, 1)
            if len(st.reorders) < MAX_REORDERS:
                st.reorders.append([pid, rx, highest])
        highest = max(highest, pid)
        latencies.append((rx - send_ns[pid]) / 1e6)
        if prev_rx is not None:
            st.gap_ms = max(st.gap_ms, (rx - prev_rx) / 1e6)
        prev_rx = rx
    st.received = len(seen)
    st.lost = st.sent - st.received
    burst = 0
    recording = False  # the current run of losses is in lost_runs
    for pid in range(len(send_ns)):
        if pid in seen:
            burst = 0
            continue
        burst += 1
        st.max_burst_lost = max(st.max_burst_lost, burst)
        if burst == 1:
            recording = len(st.lost_runs) < MAX_LOST_RUNS
            if recording:
                st.lost_runs.append([send_ns[pid], send_ns[pid], 1])
        elif recording:
            st.lost_runs[-1][1:] = [send_ns[pid], burst]
        if st.first_lost_id is None:
            st.first_lost_id = pid
            st.first_lost_sent_ns = send_ns[pid]
        st.last_lost_id = pid
        st.last_lost_sent_ns = send_ns[pid]
    latencies.sort()
    st.latency_p50_ms = round(percentile(latencies, 50), 3)
    st.latency_p99_ms = round(percentile(latencies, 99), 3)
    st.latency_max_ms = round(latencies[-1], 3) if latencies else 0.0
    st.gap_ms = round(st.gap_ms, 3)
    base = send_ns[0] if send_ns else 0
    st.timeline = {
        "send_us": [(t - base) // 1000 for t in send_ns],
        "reply_id": [pid for pid, _ in replies],
        "reply_us": [(rx - base) // 1000 for _, rx in replies],
    }
    return st


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _payload(pid: int, now_ns: int, size: int = PAYLOAD_LEN) -> bytes:
    body = PAYLOAD.pack(MAGIC, pid, now_ns)
    return body + b"\xa5" * (size - len(body))


def _echo_request(ident: int, pid: int, now_ns: int, size: int = PAYLOAD_LEN) -> bytes:
    payload = _payload(pid, now_ns, size)
    head = struct.pack("!BBHHH", 8, 0, 0, ident, pid & 0xFFFF)
    csum = _checksum(head + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, pid & 0xFFFF) + payload


def _find_probe_id(buf: bytes) -> int | None:
    at = buf.find(struct.pack("!Q", MAGIC))
    if at < 0 or at + PAYLOAD.size > len(buf):
        return None
    _magic, pid, _t = PAYLOAD.unpack_from(buf, at)
    return int(pid)


def run(target: str, rate: float, duration: float, proto: str = "icmp",
        stop_on_stdin: bool = False, grace: float = 1.0, frame_size: int = PAYLOAD_LEN + HEADERS) -> ProbeStats:
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate must be in (0, {MAX_RATE}]")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION}]")
    if not PAYLOAD.size + HEADERS <= frame_size <= MAX_FRAME:
        raise ValueError(f"frame size must be in [{PAYLOAD.size + HEADERS}, {MAX_FRAME}]")
    size = frame_size - HEADERS
    count = int(rate * duration)
    ident = os.getpid() & 0xFFFF
    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        # Past net.core.rmem_max (root only): a burst of replies must not
        # overflow the prober's own socket and count as lost probes.
        rx_sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    except OSError:
        rx_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    if proto == "icmp":
        tx_sock = rx_sock
    else:
        tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    send_ns: list[int] = []
    replies: list[tuple[int, int]] = []
    stop = threading.Event()
    sender_done = threading.Event()

    def receiver() -> None:
        poller = select.poll()
        poller.register(rx_sock, select.POLLIN)
        deadline: float | None = None
        while True:
            if sender_done.is_set() and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                return
            if not poller.poll(50):
                continue
            while True:
                try:
                    buf = rx_sock.recv(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                now = time.monotonic_ns()
                ihl = (buf[0] & 0x0F) * 4
                icmp_type = buf[ihl]
                if proto == "icmp":
                    if icmp_type != 0 or struct.unpack_from("!H", buf, ihl + 4)[0] != ident:
                        continue
                elif icmp_type != 3:
                    continue
                pid = _find_probe_id(buf[ihl + 8:])
                if pid is not None:
                    replies.append((pid, now))

    rx_thread = threading.Thread(target=receiver, daemon=True)
    rx_thread.start()
    if stop_on_stdin:
        set_at_stdin_end(stop)
    start = time.monotonic_ns()
    interval_ns = int(1e9 / rate)
    for pid in range(count):
        if stop.is_set():
            break
        due = start + pid * interval_ns
        now = time.monotonic_ns()
        if due > now:
            time.sleep((due - now) / 1e9)
        now = time.monotonic_ns()
        try:
            if proto == "icmp":
                tx_sock.sendto(_echo_request(ident, pid, now, size), (target, 0))
            else:
                tx_sock.sendto(_payload(pid, now, size), (target, UDP_PORT))
        except OSError:
            pass  # counted as lost: the probe had its id and time
        send_ns.append(now)
    sender_done.set()
    rx_thread.join()
    drops = _socket_drops(rx_sock)
    rx_sock.close()
    if tx_sock is not rx_sock:
        tx_sock.close()
    stats = analyse(send_ns, replies, rate=rate, proto=proto)
    stats.socket_drops = drops
    return stats


def _socket_drops(sock: socket.socket) -> int:
    """Replies the kernel dropped at our own socket (the last column of /proc/net/raw)."""
    inode = os.fstat(sock.fileno()).st_ino
    try:
        with open("/proc/self/net/raw") as fh:
            for line in fh:
                cols = line.split()
                if len(cols) > 9 and cols[9] == str(inode):
                    return int(cols[-1])
    except OSError:
        pass
    return -1


# The peer stands for another machine: its sends must not wait for the CPU
# the two lab hosts share.  At the default priority, a prober starved for the
# few milliseconds of a switchover sent no probe in them, and plain QEMU's
# fast kill then lost none (a busy-core CI: 0 of 5,477).
PEER_NICE = -10


def as_peer() -> None:
    """Run this process ahead of the lab hosts' (root only; else as is)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, PEER_NICE)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    as_peer()
    ap = argparse.ArgumentParser(prog="netpass-prober", description=__doc__)
    ap.add_argument("--target", required=True)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--proto", choices=("icmp", "udp"), default="icmp")
    ap.add_argument("--size", type=int, default=PAYLOAD_LEN + HEADERS, help="frame size in bytes")
    ap.add_argument("--stop-on-stdin", action="store_true")
    ap.add_argument("--timeline", help="write the per-probe timeline here as JSON")
    args = ap.parse_args(argv)
    stats = run(args.target, args.rate, args.duration, args.proto, args.stop_on_stdin, frame_size=args.size)
    if args.timeline:
        with open(args.timeline, "w") as fh:
            json.dump(stats.timeline, fh)
    json.dump(stats.summary(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
