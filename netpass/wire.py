"""The batch wire format: frames captured on the source, as zstd batches.

A batch is a fixed header followed by a body, zstd-compressed when that
helps::

    header (32 bytes, network byte order)
      magic     4s   b"NPB1"
      version   B    2
      flags     B    bit 0: body is zstd-compressed
      reserved  H    0
      seq       Q    batch number in the session, from 0, +1 per batch
      count     I    frames in the batch
      raw_len   I    body length once decompressed
      body_len  I    body length on the wire
      check     I    XXH3-64 of the decompressed body, low 32 bits

    body: columns, then the records (arrays little-endian)
      ts_us     count x u32   capture time, microseconds since the session started
      len       count x u32   frame length
      nic       count x u8    index of the NIC in the session's NIC list
      hdr_len   count x u8    virtio-net header length: 0 or 10
      records   per frame: its virtio-net header (hdr_len bytes), then the
                Ethernet frame (len bytes), back to back

Version 1 interleaved a 12-byte record header with each frame.  Version 2
stores the same fields column-wise: both ends then handle a batch with a
few bulk operations (array conversions, one join, one list of slices)
instead of a struct call per frame, and a record is the virtio-net header
and frame contiguous, as a tap read returns it and as a TX ring slot takes
it, so neither end copies a frame to add or strip a header.

Authenticity and replay protection come from the channel (every message is
MACed); the check catches corruption of the body itself (XXH3 runs at 62
GB/s here, CRC-32 at 4: at 1500-byte frames that was 0.37 us per frame at
each end).  The decoder checks
every field against hard limits before it allocates anything, and never
decompresses more than ``raw_len`` bytes.
"""

from __future__ import annotations

import array
import functools
import itertools
import operator
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from .errors import NetpassError

MAGIC = b"NPB1"
VERSION = 2
FLAG_ZSTD = 0x01
HEADER = struct.Struct("!4sBBHQIIII")
COLUMNS = 10  # bytes of columns per frame: ts_us, len, nic, hdr_len
VNET_HDR_LEN = 10
MIN_FRAME = 14
MAX_FRAME = 65_550
MAX_COUNT = 65_536
MAX_RAW = 16 << 20
MAX_BODY = MAX_RAW + 1024
ZSTD_LEVEL = -1  # measured: faster than level 1 and no worse a ratio on mixed traffic (BENCHMARKS.md)
_BIG_ENDIAN = sys.byteorder == "big"


class WireError(NetpassError):
    """A batch that is malformed, oversized or corrupt."""


class Frame(NamedTuple):
    """One captured frame (a tuple: cheap to make at capture rates)."""

    nic: int
    vnet_hdr: bytes
    data: bytes
    ts_us: int = 0

    @property
    def wire_size(self) -> int:
        return COLUMNS + len(self.vnet_hdr) + len(self.data)


_NIC, _VNET, _DATA, _TS = (operator.itemgetter(i) for i in range(4))  # a Frame's fields


def wire_size(frames: Sequence[Frame]) -> int:
    """Bytes of ``frames`` in a batch body: each frame's ``wire_size``, summed in C."""
    return (COLUMNS * len(frames) + sum(map(len, map(_VNET, frames)))
            + sum(map(len, map(_DATA, frames))))


def _u32(values: Sequence[int] | bytes) -> bytes:
    arr = array.array("I", values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def _from_u32(raw: bytes | memoryview) -> array.array[int]:
    arr = array.array("I")
    arr.frombytes(raw)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr


assert array.array("I").itemsize == 4


@dataclass(frozen=True, eq=False)
class Batch:
    """A decoded batch, column-wise; record i (``records[i]``) is frame i
    with its virtio-net header in front (``hdr_lens[i]`` bytes of it)."""

    seq: int
    nics: bytes
    hdr_lens: bytes
    ts_us: array.array[int]
    body: memoryview  # the whole body: columns, then the records back to back
    offsets: npt.NDArray[np.int64]  # record i is body[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.nics)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        return (self.seq, self.nics, self.hdr_lens, self.ts_us, self.records) == \
            (other.seq, other.nics, other.hdr_lens, other.ts_us, other.records)

    @functools.cached_property
    def records(self) -> list[memoryview]:
        """Read-only views into ``body``, made when first asked for: the
        usual batch goes to the VM whole and never needs them."""
        ends = self.offsets.tolist()
        return list(map(self.body.__getitem__, map(slice, ends, ends[1:])))

    def column(self, at: int, width: int) -> npt.NDArray[np.uint8]:
        """Bytes ``at`` to ``at + width`` of every record, one row each (a
        copy); every record must be at least ``at + width`` bytes long."""
        src = np.frombuffer(self.body, np.uint8)
        starts = self.offsets[:-1] + at
        if not len(starts):
            return np.zeros((0, width), np.uint8)
        windows = np.ndarray((len(src) - width + 1, width), np.uint8, src, 0, (1, 1))  # no copy
        return windows[starts]

    def data(self, i: int) -> bytes | memoryview:
        """Frame i without its virtio-net header."""
        h = self.hdr_lens[i]
        return self.records[i][h:] if h else self.records[i]

    @property
    def frames(self) -> list[Frame]:
        """The batch as Frames (copies: for tests and tools, not the datapath)."""
        return [Frame(n, bytes(r[:h]), bytes(r[h:]), t)
                for n, h, r, t in zip(self.nics, self.hdr_lens, self.records, self.ts_us, strict=True)]


_cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
_NO_HEADER = bytes(HEADER.size)


def encode(seq: int, frames: Sequence[Frame], compress: bool = True) -> bytes | bytearray:
    # Column by column with map(): no Python code runs per frame.
    vnets = list(map(_VNET, frames))
    datas = list(map(_DATA, frames))
    hdrs = bytes(map(len, vnets))
    if hdrs.strip(b"\x00\x0a"):
        bad = next(h for h in hdrs if h not in (0, VNET_HDR_LEN))
        raise WireError(f"virtio-net header must be 0 or {VNET_HDR_LEN} bytes, not {bad}")
    lens = list(map(len, datas))
    if frames and not (MIN_FRAME <= min(lens) and max(lens) <= MAX_FRAME):
        bad = next(n for n in lens if not MIN_FRAME <= n <= MAX_FRAME)
        raise WireError(f"frame length {bad} outside {MIN_FRAME}..{MAX_FRAME}")
    try:
        nics = bytes(map(_NIC, frames))
    except ValueError as exc:
        raise WireError("a NIC index must be 0..255") from exc
    records: list[bytes] = [b""] * (2 * len(frames))
    records[0::2] = vnets
    records[1::2] = datas
    ts = _u32(list(map(operator.and_, map(_TS, frames), itertools.repeat(0xFFFFFFFF))))
    return _pack(seq, len(frames), [ts, _u32(lens), nics, hdrs, *records], compress)


def encode_records(seq: int, records: list[bytes], nic: int, hdr_len: int, ts_us: int,
                   compress: bool = True) -> bytes | bytearray:
    """The fast path: ``records`` read from one NIC's tap, each its virtio-net
    header (``hdr_len`` bytes) then the frame, all stamped ``ts_us``."""
    if hdr_len not in (0, VNET_HDR_LEN):
        raise WireError(f"virtio-net header must be 0 or {VNET_HDR_LEN} bytes, not {hdr_len}")
    if not 0 <= nic <= 255:
        raise WireError("a NIC index must be 0..255")
    n = len(records)
    lens = [len(r) - hdr_len for r in records]
    if records and not (MIN_FRAME <= min(lens) and max(lens) <= MAX_FRAME):
        bad = next(x for x in lens if not MIN_FRAME <= x <= MAX_FRAME)
        raise WireError(f"frame length {bad} outside {MIN_FRAME}..{MAX_FRAME}")
    return _pack(seq, n, [_u32([ts_us & 0xFFFFFFFF]) * n, _u32(lens), bytes([nic]) * n,
                          bytes([hdr_len]) * n, *records], compress)


def _check(body: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF


def _pack(seq: int, count: int, parts: list[bytes], compress: bool) -> bytes | bytearray:
    if count > MAX_COUNT:
        raise WireError(f"a batch holds at most {MAX_COUNT} frames, not {count}")
    raw_len = sum(map(len, parts))
    if raw_len > MAX_RAW:
        raise WireError(f"batch body of {raw_len} bytes exceeds {MAX_RAW}")
    if compress and raw_len:
        raw = b"".join(parts)
        packed = _cctx.compress(raw)
        if len(packed) < raw_len:
            return HEADER.pack(MAGIC, VERSION, FLAG_ZSTD, 0, seq, count, raw_len, len(packed),
                               _check(raw)) + packed
    # Uncompressed: one join makes the batch, header room included; the
    # header goes in place once the body's check is known (no second copy).
    batch = bytearray().join([_NO_HEADER, *parts])
    HEADER.pack_into(batch, 0, MAGIC, VERSION, 0, 0, seq, count, raw_len, raw_len,
                     _check(memoryview(batch)[HEADER.size:]))
    return batch


def _decompress(body: memoryview, raw_len: int) -> bytes:
    """At most ``raw_len`` bytes out of a zstd body, whatever it claims.

    python-zstandard's one-shot decompress ignores ``max_output_size`` when
    the frame's header declares a content size, and allocates what it
    declares: a 32 KB batch declaring 1 GiB took 1 GiB before failing, one
    declaring 2^45 bytes raised MemoryError.  So the declared size is
    checked first, and the body is read through a stream with a bound.
    """
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise WireError(f"zstd body has no valid frame header: {exc}") from exc
    if declared > raw_len:  # (-1: not declared)
        raise WireError(f"zstd body declares {declared} bytes, the batch {raw_len}")
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=False) as reader:
            out = bytearray()
            while len(out) <= raw_len:
                chunk = reader.read(raw_len + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise WireError(f"zstd body does not decompress: {exc}") from exc
    if len(out) > raw_len:
        raise WireError(f"zstd body decompresses past the batch's {raw_len} bytes")
    return bytes(out)


def decode(blob: bytes | bytearray | memoryview, nic_count: int = 256,
           max_frames: int = MAX_COUNT) -> Batch:
    """Parse and check one batch; raise :class:`WireError` on any defect."""
    if len(blob) < HEADER.size:
        raise WireError(f"batch of {len(blob)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, flags, reserved, seq, count, raw_len, body_len, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not a netpass batch")
    if version != VERSION:
        raise WireError(f"batch version {version} is not supported (this netpass speaks {VERSION}; "
                        "run the same netpass version on both hosts)")
    if flags & ~FLAG_ZSTD or reserved:
        raise WireError(f"unknown flags {flags:#x}/{reserved:#x}")
    if count > min(MAX_COUNT, max_frames):
        raise WireError(f"batch claims {count} frames; the limit is {min(MAX_COUNT, max_frames)}")
    if raw_len > MAX_RAW or body_len > MAX_BODY:
        raise WireError(f"batch sizes {raw_len}/{body_len} exceed the limit of {MAX_RAW} bytes")
    if len(blob) != HEADER.size + body_len:
        raise WireError(f"batch says {body_len} body bytes but carries {len(blob) - HEADER.size}")
    if raw_len < count * (COLUMNS + MIN_FRAME):
        raise WireError(f"body of {raw_len} bytes is too short for {count} frames")
    body = memoryview(blob)[HEADER.size:]
    if flags & FLAG_ZSTD:
        raw = memoryview(_decompress(body, raw_len))
    else:
        # The records are slices of the message, not copies (of a read-only
        # message, so that they hash like bytes).
        raw = body if body.readonly else memoryview(bytes(body))
    if len(raw) != raw_len:
        raise WireError(f"body is {len(raw)} bytes once decompressed, header says {raw_len}")
    if _check(raw) != crc:
        raise WireError("body checksum mismatch: the batch is corrupt")
    ts = _from_u32(raw[:4 * count])
    lens = np.frombuffer(raw, "<u4", count, 4 * count).astype(np.int64)
    nics = bytes(raw[8 * count:9 * count])
    hdrs = bytes(raw[9 * count:10 * count])
    if count:
        if max(nics) >= nic_count:
            raise WireError(f"record {nics.index(max(nics))}: NIC index {max(nics)} but the "
                            f"session has {nic_count} NICs")
        if hdrs.strip(b"\x00\x0a"):
            i = next(k for k, h in enumerate(hdrs) if h not in (0, VNET_HDR_LEN))
            raise WireError(f"record {i}: virtio-net header length {hdrs[i]}")
        bad = (lens < MIN_FRAME) | (lens > MAX_FRAME)
        if bad.any():
            i = int(bad.argmax())
            raise WireError(f"record {i}: frame length {lens[i]}")
    start = COLUMNS * count
    ends = np.empty(count + 1, np.int64)
    ends[0] = start
    np.cumsum(lens + np.frombuffer(hdrs, np.uint8), out=ends[1:])
    ends[1:] += start
    total = int(ends[-1])
    if total > raw_len:
        raise WireError("the records run past the end of the body")
    if total < raw_len:
        raise WireError(f"{raw_len - total} bytes of garbage after the last record")
    return Batch(seq=seq, nics=nics, hdr_lens=hdrs, ts_us=ts, body=raw, offsets=ends)


def dst_mac(frame: bytes | memoryview) -> bytes | memoryview:
    return frame[:6]


def is_group(mac: bytes | memoryview) -> bool:
    """Broadcast or multicast: the group bit of the first octet."""
    return bool(mac[0] & 1)
