"""The batch wire format: frames captured on the source, as zstd batches.

A batch is a fixed header followed by a body, zstd-compressed when that
helps::

    header (32 bytes, network byte order)
      magic     4s   b"NPB1"
      version   B    1
      flags     B    bit 0: body is zstd-compressed
      reserved  H    0
      seq       Q    batch number in the session, from 0, +1 per batch
      count     I    frames in the batch
      raw_len   I    body length once decompressed
      body_len  I    body length on the wire
      crc32     I    CRC-32 of the decompressed body

    body: ``count`` records, back to back
      nic       B    index of the NIC in the session's NIC list
      hdr_len   B    virtio-net header length that follows: 0 or 10
      reserved  H    0
      ts_us     I    capture time, microseconds since the session started
      len       I    frame length
      vnet header (hdr_len bytes), then the Ethernet frame (len bytes)

Authenticity and replay protection come from the channel (every message is
MACed); the CRC catches corruption of the body itself.  The decoder checks
every field against hard limits before it allocates anything, and never
decompresses more than ``raw_len`` bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import zstandard

from .errors import NetpassError

MAGIC = b"NPB1"
VERSION = 1
FLAG_ZSTD = 0x01
HEADER = struct.Struct("!4sBBHQIIII")
RECORD = struct.Struct("!BBHII")
VNET_HDR_LEN = 10
MIN_FRAME = 14
MAX_FRAME = 65_550
MAX_COUNT = 65_536
MAX_RAW = 16 << 20
MAX_BODY = MAX_RAW + 1024


class WireError(NetpassError):
    """A batch that is malformed, oversized or corrupt."""


@dataclass(frozen=True)
class Frame:
    nic: int
    vnet_hdr: bytes
    data: bytes
    ts_us: int = 0

    @property
    def wire_size(self) -> int:
        return RECORD.size + len(self.vnet_hdr) + len(self.data)


@dataclass(frozen=True)
class Batch:
    seq: int
    frames: list[Frame]


_cctx = zstandard.ZstdCompressor(level=1)


def encode(seq: int, frames: Iterable[Frame], compress: bool = True) -> bytes:
    parts: list[bytes] = []
    count = 0
    for f in frames:
        if len(f.vnet_hdr) not in (0, VNET_HDR_LEN):
            raise WireError(f"virtio-net header must be 0 or {VNET_HDR_LEN} bytes, not {len(f.vnet_hdr)}")
        if not MIN_FRAME <= len(f.data) <= MAX_FRAME:
            raise WireError(f"frame length {len(f.data)} outside {MIN_FRAME}..{MAX_FRAME}")
        parts.append(RECORD.pack(f.nic, len(f.vnet_hdr), 0, f.ts_us & 0xFFFFFFFF, len(f.data)))
        parts.append(f.vnet_hdr)
        parts.append(f.data)
        count += 1
    if count > MAX_COUNT:
        raise WireError(f"a batch holds at most {MAX_COUNT} frames, not {count}")
    raw = b"".join(parts)
    if len(raw) > MAX_RAW:
        raise WireError(f"batch body of {len(raw)} bytes exceeds {MAX_RAW}")
    flags = 0
    body = raw
    if compress and raw:
        packed = _cctx.compress(raw)
        if len(packed) < len(raw):
            body, flags = packed, FLAG_ZSTD
    header = HEADER.pack(MAGIC, VERSION, flags, 0, seq, count, len(raw), len(body),
                         zlib.crc32(raw))
    return header + body


def decode(blob: bytes, nic_count: int = 256, max_frames: int = MAX_COUNT) -> Batch:
    """Parse and check one batch; raise :class:`WireError` on any defect."""
    if len(blob) < HEADER.size:
        raise WireError(f"batch of {len(blob)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, flags, reserved, seq, count, raw_len, body_len, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not a netpass batch")
    if version != VERSION:
        raise WireError(f"batch version {version} is not supported (this netpass speaks {VERSION})")
    if flags & ~FLAG_ZSTD or reserved:
        raise WireError(f"unknown flags {flags:#x}/{reserved:#x}")
    if count > min(MAX_COUNT, max_frames):
        raise WireError(f"batch claims {count} frames; the limit is {min(MAX_COUNT, max_frames)}")
    if raw_len > MAX_RAW or body_len > MAX_BODY:
        raise WireError(f"batch sizes {raw_len}/{body_len} exceed the limit of {MAX_RAW} bytes")
    if len(blob) != HEADER.size + body_len:
        raise WireError(f"batch says {body_len} body bytes but carries {len(blob) - HEADER.size}")
    body = blob[HEADER.size:]
    if flags & FLAG_ZSTD:
        try:
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise WireError(f"zstd body does not decompress: {exc}") from exc
    else:
        raw = bytes(body)
    if len(raw) != raw_len:
        raise WireError(f"body is {len(raw)} bytes once decompressed, header says {raw_len}")
    if zlib.crc32(raw) != crc:
        raise WireError("body checksum mismatch: the batch is corrupt")
    frames: list[Frame] = []
    off = 0
    view = memoryview(raw)
    for i in range(count):
        if off + RECORD.size > len(raw):
            raise WireError(f"record {i} is truncated")
        nic, hdr_len, rsv, ts_us, flen = RECORD.unpack_from(raw, off)
        off += RECORD.size
        if rsv:
            raise WireError(f"record {i}: reserved field set")
        if nic >= nic_count:
            raise WireError(f"record {i}: NIC index {nic} but the session has {nic_count} NICs")
        if hdr_len not in (0, VNET_HDR_LEN):
            raise WireError(f"record {i}: virtio-net header length {hdr_len}")
        if not MIN_FRAME <= flen <= MAX_FRAME:
            raise WireError(f"record {i}: frame length {flen}")
        end = off + hdr_len + flen
        if end > len(raw):
            raise WireError(f"record {i} runs past the end of the body")
        frames.append(Frame(nic, bytes(view[off:off + hdr_len]), bytes(view[off + hdr_len:end]), ts_us))
        off = end
    if off != len(raw):
        raise WireError(f"{len(raw) - off} bytes of garbage after the last record")
    return Batch(seq=seq, frames=frames)


def dst_mac(frame: bytes) -> bytes:
    return frame[:6]


def is_group(mac: bytes) -> bool:
    """Broadcast or multicast: the group bit of the first octet."""
    return bool(mac[0] & 1)
