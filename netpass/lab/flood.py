"""A flood of frames toward the guest from the peer, bounded in count and time.

Run inside the peer namespace as ``python -m netpass.lab.flood``.  Frames go
to the guest's MAC with the IEEE 802 local experimental EtherType, which the
guest takes and drops: what is measured is how fast the VM consumes its
NIC, and what a switchover does to frames that keep coming.  It sends
``--pps`` frames a second in steps of 1 ms until ``--duration`` or its
standard input closes, and prints one JSON object (frames sent).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from .prober import set_at_stdin_end

ETHERTYPE = b"\x88\xb5"
MAX_PPS = 200_000
MAX_DURATION = 600.0


def run(ifname: str, dst_mac: str, src_mac: str, pps: int, duration: float, size: int = 64,
        stop_on_stdin: bool = False) -> dict[str, object]:
    from ..packet import TxRing

    if not 0 < pps <= MAX_PPS or not 0 < duration <= MAX_DURATION:
        raise ValueError(f"pps must be in (0, {MAX_PPS}] and duration in (0, {MAX_DURATION}]")
    stop = threading.Event()
    if stop_on_stdin:
        set_at_stdin_end(stop)
    head = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + ETHERTYPE
    ring = TxRing(ifname, bypass=False)
    offered = sent = 0
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now - t0 >= duration:
                break
            due = int((now - t0) * pps) + 1
            if due > offered:
                n = min(due - offered, 1024)
                recs = [bytes(10) + head + (offered + i).to_bytes(8, "big").ljust(size - 14, b"\0")
                        for i in range(n)]
                sent += ring.send(recs)
                offered += n  # what the peer's own device refused is not sent again: the pace holds
            time.sleep(0.001)
    finally:
        ring.close()
    return {"flood_sent": sent, "flood_refused": offered - sent, "flood_pps": pps,
            "flood_s": round(time.monotonic() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netpass-flood", description=__doc__)
    ap.add_argument("--ifname", required=True)
    ap.add_argument("--dst-mac", required=True)
    ap.add_argument("--src-mac", required=True)
    ap.add_argument("--pps", type=int, required=True)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--stop-on-stdin", action="store_true")
    args = ap.parse_args(argv)
    json.dump(run(args.ifname, args.dst_mac, args.src_mac, args.pps, args.duration,
                  stop_on_stdin=args.stop_on_stdin), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
