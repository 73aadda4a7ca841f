"""Strangers at the agent's door, for the lab: connections without the
token that send an oversized length prefix, deeply nested JSON, or nothing,
from a few local source addresses, held open while a real migration runs.

Run inside the destination's namespace (the agent's host):

    python -m netpass.lab.stranger --target 198.19.0.2:7411 --count 200 \\
        --source 127.0.0.2 --source 127.0.0.3 --hold-s 60

It opens ``--count`` connections (bounded), keeps them until its stdin
closes or ``--hold-s`` passes, and prints what happened as one JSON line.
Only lab addresses are allowed as the target.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import socket
import sys
import time

from ..channel import HELLO, PREFIX

LAB_NET = ipaddress.ip_network("198.18.0.0/15")
MAX_COUNT = 1000
MAX_HOLD_S = 300.0


def _payload(kind: int) -> bytes:
    if kind == 0:  # a prefix claiming 32 MiB, then nothing
        return PREFIX.pack(32 << 20, HELLO)
    if kind == 1:  # a HELLO of nested JSON
        body = b"[" * 50_000
        return PREFIX.pack(1 + len(body) + 16, HELLO) + body
    return b""  # silence


def attack(host: str, port: int, count: int, sources: list[str]) -> tuple[list[socket.socket], dict[str, int]]:
    socks: list[socket.socket] = []
    tally = {"opened": 0, "refused": 0, "send_failed": 0}
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.bind((sources[i % len(sources)], 0))
            s.connect((host, port))
        except OSError:
            tally["refused"] += 1
            s.close()
            continue
        tally["opened"] += 1
        data = _payload(i % 3)
        if data:
            try:
                s.sendall(data)
            except OSError:
                tally["send_failed"] += 1
        socks.append(s)
    return socks, tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netpass.lab.stranger")
    ap.add_argument("--target", required=True, help="HOST:PORT of the agent (a lab address)")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--source", action="append", default=[], help="local address to connect from")
    ap.add_argument("--hold-s", type=float, default=60.0)
    a = ap.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    if ipaddress.ip_address(host) not in LAB_NET:
        ap.error(f"{host} is not a lab address ({LAB_NET})")
    if not 0 < a.count <= MAX_COUNT or not 0 < a.hold_s <= MAX_HOLD_S:
        ap.error(f"--count must be 1..{MAX_COUNT} and --hold-s 0..{MAX_HOLD_S:.0f}")
    socks, tally = attack(host, int(port), a.count, a.source or ["0.0.0.0"])
    print(json.dumps({"phase": "holding", **tally}), flush=True)
    # Held until told (stdin closes) or the bound; the agent may close them first.
    end = time.monotonic() + a.hold_s
    closed_by_agent = 0
    while time.monotonic() < end:
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    for s in socks:
        try:
            s.setblocking(False)
            if s.recv(1) == b"":
                closed_by_agent += 1
        except BlockingIOError:
            pass
        except OSError:
            closed_by_agent += 1
        s.close()
    print(json.dumps({"phase": "done", **tally, "closed_by_agent": closed_by_agent}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
