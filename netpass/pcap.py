"""Write frames as a classic pcap file (libpcap format, Ethernet link type).

The only module that knows the format; Wireshark and tshark open it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import UsageError

MAGIC_USEC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262_144
GLOBAL = struct.Struct("<IHHiIII")
RECORD = struct.Struct("<IIII")


def encode(frames: Iterable[tuple[float, bytes]]) -> bytes:
    """``frames``: (unix time in seconds, Ethernet frame) pairs."""
    out = [GLOBAL.pack(MAGIC_USEC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)]
    for ts, data in frames:
        sec = int(ts)
        usec = int(round((ts - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        kept = data[:SNAPLEN]
        out.append(RECORD.pack(sec, usec, len(kept), len(data)))
        out.append(kept)
    return b"".join(out)


def write(path: Path, frames: Iterable[tuple[float, bytes]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(encode(frames))
        tmp.replace(path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc


def read(data: bytes) -> list[tuple[float, bytes]]:
    """Parse what :func:`encode` wrote (for tests and checks)."""
    if len(data) < GLOBAL.size or GLOBAL.unpack_from(data)[0] != MAGIC_USEC:
        raise ValueError("not a little-endian microsecond pcap file")
    off, out = GLOBAL.size, []
    while off < len(data):
        sec, usec, incl, _orig = RECORD.unpack_from(data, off)
        off += RECORD.size
        out.append((sec + usec / 1e6, data[off:off + incl]))
        off += incl
    return out
