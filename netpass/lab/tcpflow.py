"""A bulk TCP flow into the guest, measured as a TCP user feels a switchover.

Run inside the peer namespace as ``python -m netpass.lab.tcpflow``.  It
connects to the guest's sink (busybox ``nc``, see image.py), sends at a
paced rate until ``--duration`` or its standard input closes, whichever
comes first, samples the connection's ``tcp_info`` every millisecond, and
prints one JSON object:

* ``stall_ms``: the longest time the acknowledged bytes did not move while
  data was outstanding (a switchover's pause, plus whatever recovery cost);
* ``stall_start_ms``: when that stall began, from the flow's start;
* ``retransmits`` (``tcpi_total_retrans``), ``bytes_retrans``, and
  ``dsack_dups``, the retransmissions the receiver reported as needless;
* ``mbit_per_s``: acknowledged bytes over the flow's life.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import threading
import time

from .prober import as_peer, set_at_stdin_end

SINK_PORT = 5001
MAX_DURATION = 600.0
TCP_INFO_LEN = 232
# struct tcp_info (linux/tcp.h): offsets of the fields read here
OFF_UNACKED = 24
OFF_TOTAL_RETRANS = 100
OFF_BYTES_ACKED = 120
OFF_BYTES_RETRANS = 208
OFF_DSACK_DUPS = 216
SO_MAX_PACING_RATE = 47
CHUNK = 64 << 10


def tcp_info(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)

    def u32(off: int) -> int:
        return int(struct.unpack_from("=I", raw, off)[0])

    def u64(off: int) -> int:
        return int(struct.unpack_from("=Q", raw, off)[0])

    return {"unacked": u32(OFF_UNACKED), "total_retrans": u32(OFF_TOTAL_RETRANS),
            "bytes_acked": u64(OFF_BYTES_ACKED),
            "bytes_retrans": u64(OFF_BYTES_RETRANS) if len(raw) >= OFF_BYTES_RETRANS + 8 else 0,
            "dsack_dups": u32(OFF_DSACK_DUPS) if len(raw) >= OFF_DSACK_DUPS + 4 else 0}


def longest_stall(samples: list[tuple[float, int, int]]) -> tuple[float, float]:
    """(seconds, start) of the longest stretch in which the acknowledged bytes
    did not move while some were unacknowledged; samples are (time,
    bytes_acked, unacked)."""
    best, best_at = 0.0, 0.0
    since: float | None = None
    last_acked = -1
    for t, acked, unacked in samples:
        if acked != last_acked:
            if since is not None and t - since > best:
                best, best_at = t - since, since
            since = t if unacked else None
            last_acked = acked
        elif since is None and unacked:
            since = t
    if since is not None and samples and samples[-1][0] - since > best:
        best, best_at = samples[-1][0] - since, since
    return best, best_at


def run(target: str, rate_mbit: float, duration: float, stop_on_stdin: bool = False) -> dict[str, object]:
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION}]")
    sock = socket.create_connection((target, SINK_PORT), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, int(rate_mbit * 1e6 / 8))
    sock.setblocking(False)
    stop = threading.Event()
    if stop_on_stdin:
        set_at_stdin_end(stop)
    data = b"\xa5" * CHUNK
    samples: list[tuple[float, int, int]] = []
    t0 = time.monotonic()
    deadline = t0 + duration
    next_sample = t0
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while not stop.is_set() and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_sample:
            info = tcp_info(sock)
            samples.append((now - t0, info["bytes_acked"], info["unacked"]))
            next_sample = now + 0.001
        if poller.poll(1):
            try:
                sock.send(data)
            except (BlockingIOError, InterruptedError):
                pass
    end = time.monotonic()
    info = tcp_info(sock)
    samples.append((end - t0, info["bytes_acked"], info["unacked"]))
    sock.close()
    stall, stall_at = longest_stall(samples)
    return {"duration_s": round(end - t0, 3), "bytes_acked": info["bytes_acked"],
            "mbit_per_s": round(info["bytes_acked"] * 8 / (end - t0) / 1e6, 2),
            "stall_ms": round(stall * 1000, 1), "stall_start_ms": round(stall_at * 1000, 1),
            "stall_start_mono": t0 + stall_at,
            "retransmits": info["total_retrans"], "bytes_retrans": info["bytes_retrans"],
            "dsack_dups": info["dsack_dups"], "rate_mbit": rate_mbit}


def main(argv: list[str] | None = None) -> int:
    as_peer()
    ap = argparse.ArgumentParser(prog="netpass-tcpflow", description=__doc__)
    ap.add_argument("--target", required=True)
    ap.add_argument("--rate-mbit", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--stop-on-stdin", action="store_true")
    args = ap.parse_args(argv)
    json.dump(run(args.target, args.rate_mbit, args.duration, args.stop_on_stdin), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
