"""The batch decoder: round trips, and property/fuzz tests on hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netpass import wire
from netpass.errors import NetpassError
from netpass.wire import Frame, WireError

frames_st = st.lists(
    st.builds(Frame,
              nic=st.integers(0, 3),
              vnet_hdr=st.sampled_from([b"", bytes(10), b"\x01" + bytes(9)]),
              data=st.binary(min_size=14, max_size=300),
              ts_us=st.integers(0, 2**32 - 1)),
    max_size=40)


@given(frames_st, st.integers(0, 2**64 - 1), st.booleans())
def test_roundtrip(frames: list[Frame], seq: int, compress: bool) -> None:
    batch = wire.decode(wire.encode(seq, frames, compress), nic_count=4)
    assert batch.seq == seq
    assert batch.frames == frames


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(blob: bytes) -> None:
    try:
        wire.decode(blob)
    except WireError:
        pass


@settings(max_examples=300)
@given(frames_st.filter(bool), st.data())
def test_any_single_byte_corruption_is_caught(frames: list[Frame], data: st.DataObject) -> None:
    blob = bytearray(wire.encode(7, frames, compress=data.draw(st.booleans())))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    try:
        batch = wire.decode(bytes(blob), nic_count=4)
    except WireError:
        return
    # Only the seq and ts fields are not covered by the CRC or a check.
    assert len(batch.frames) == len(frames)
    assert [f.data for f in batch.frames] == [f.data for f in frames]


@given(frames_st.filter(bool), st.data())
def test_truncation_is_caught(frames: list[Frame], data: st.DataObject) -> None:
    blob = wire.encode(1, frames)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(WireError):
        wire.decode(blob[:cut])


def _header(**kw: int) -> bytes:
    fields = dict(magic=wire.MAGIC, version=wire.VERSION, flags=0, reserved=0, seq=0, count=0, raw_len=0,
                  body_len=0, crc=0)
    fields.update(kw)  # type: ignore[arg-type]
    return wire.HEADER.pack(*fields.values())


@pytest.mark.parametrize("blob,needle", [
    (b"", "shorter"),
    (_header(magic=b"XXXX"), "bad magic"),  # type: ignore[arg-type]
    (_header(version=9), "version 9"),
    (_header(version=1), "run the same netpass version"),
    (_header(count=2, raw_len=10, body_len=10) + bytes(10), "too short for 2 frames"),
    (_header(flags=0x80), "unknown flags"),
    (_header(count=10**6), "limit"),
    (_header(raw_len=1 << 30), "exceed"),
    (_header(body_len=5), "carries 0"),
])
def test_header_defects(blob: bytes, needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        wire.decode(blob)


def test_decompression_bomb_is_bounded() -> None:
    import zstandard

    raw = bytes(64 << 20)
    body = zstandard.ZstdCompressor().compress(raw)
    blob = _header(flags=1, count=1, raw_len=100, body_len=len(body), crc=wire._check(raw[:100])) + body
    with pytest.raises(WireError):
        wire.decode(blob)


BOMB_PROGRAM = """
import resource, struct, sys, zstandard
from netpass import wire
declared, real = int(sys.argv[1]), sys.argv[2] == "real"
if real:
    # A body that truly decompresses to ``declared`` zero bytes: ~32 KB a GiB,
    # made in chunks so that this process never holds it.
    cobj = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=declared)
    chunk, f = bytes(1 << 20), bytearray()
    for _ in range(declared >> 20):
        f += cobj.compress(chunk)
    f += cobj.flush()
else:
    # A small body whose frame header declares ``declared`` bytes.
    f = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64)))
    desc = f[4]
    single = (desc >> 5) & 1
    off = 5 + (0 if single else 1) + [0, 1, 2, 4][desc & 3]
    width = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[desc >> 6]
    f = f[:4] + bytes([(3 << 6) | (desc & 0x3F)]) + f[5:off] + struct.pack("<Q", declared) + f[off + width:]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
blob = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.FLAG_ZSTD, 0, 0, 1, 4096, len(f), 0) + bytes(f)
try:
    wire.decode(blob)
    outcome = "decoded"
except wire.WireError:
    outcome = "WireError"
except MemoryError:
    outcome = "MemoryError"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(outcome, (after - before) // 1024, len(f))
"""


@pytest.mark.parametrize("declared,real", [(1 << 30, "real"), (1 << 45, "header")])
def test_a_decompression_bomb_costs_no_memory(declared: int, real: str) -> None:
    """A 32 KB zstd body that decompresses to 1 GiB, and a tiny one whose
    frame header declares 2^45 bytes: each refused with a WireError before
    anything of that size is allocated (peak RSS measured in a fresh
    process; python-zstandard's one-shot decompress ignores its output
    bound when the header declares a size: it took 1 GiB for the first and
    raised MemoryError for the second)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BOMB_PROGRAM, str(declared), real], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    outcome, grew_mib, size = out.stdout.split()
    assert int(size) < 64 << 10
    assert outcome == "WireError"
    assert int(grew_mib) < 16, f"peak RSS grew {grew_mib} MiB"


def test_nic_index_checked_against_session() -> None:
    blob = wire.encode(0, [Frame(5, b"", bytes(60))])
    with pytest.raises(WireError, match="NIC index 5"):
        wire.decode(blob, nic_count=2)


def test_encoder_refuses_bad_frames() -> None:
    with pytest.raises(WireError):
        wire.encode(0, [Frame(0, b"abc", bytes(60))])
    with pytest.raises(WireError):
        wire.encode(0, [Frame(0, b"", bytes(5))])
    assert issubclass(WireError, NetpassError)


def _body(ts: list[int], lens: list[int], nics: bytes, hdrs: bytes, records: bytes) -> bytes:
    import array

    return (array.array("I", ts).tobytes() + array.array("I", lens).tobytes() + nics + hdrs + records)


def _blob(count: int, raw: bytes) -> bytes:
    return _header(count=count, raw_len=len(raw), body_len=len(raw), crc=wire._check(raw)) + raw


def test_garbage_after_records() -> None:
    raw = _body([0], [14], b"\0", b"\0", bytes(14) + b"junk")
    with pytest.raises(WireError, match="garbage"):
        wire.decode(_blob(1, raw))


@pytest.mark.parametrize("lens,nics,hdrs,records,needle", [
    ([14], b"\0", b"\0", bytes(13), "too short"),
    ([13], b"\0", b"\0", bytes(14), "frame length 13"),
    ([14], b"\0", b"\x05", bytes(19), "header length 5"),
    ([14], b"\x09", b"\0", bytes(14), "NIC index 9"),
    ([14, 14], b"\0\0", b"\0\x0a", bytes(14 + 23), "past the end"),
    ([14, 14], b"\0\0", b"\0\x0a", bytes(14 + 25), "garbage"),
])
def test_column_defects(lens: list[int], nics: bytes, hdrs: bytes, records: bytes, needle: str) -> None:
    raw = _body([0] * len(lens), lens, nics, hdrs, records)
    with pytest.raises(WireError, match=needle):
        wire.decode(_blob(len(lens), raw), nic_count=2)


def test_fast_path_matches_frames() -> None:
    recs = [bytes([i]) * 10 + bytes([i]) * (20 + i) for i in range(5)]
    fast = wire.decode(wire.encode_records(3, recs, 1, 10, 77))
    slow = wire.decode(wire.encode(3, [Frame(1, r[:10], r[10:], 77) for r in recs]))
    assert fast == slow and fast.records == recs
    assert [fast.data(i) for i in range(5)] == [r[10:] for r in recs]


def test_group_bit() -> None:
    assert wire.is_group(b"\xff" * 6) and wire.is_group(b"\x01\x00\x5e\x00\x00\x01")
    assert not wire.is_group(b"\x52\x54\x00\x12\x34\x56")
    assert struct.calcsize("!4sBBHQIIII") == wire.HEADER.size == 32
    assert struct.calcsize("<IIBB") == wire.COLUMNS


@given(frames_st)
def test_wire_size_is_the_body_length(frames: list[Frame]) -> None:
    blob = wire.encode(0, frames, compress=False)
    raw_len = wire.HEADER.unpack_from(blob)[6]
    assert wire.wire_size(frames) == sum(f.wire_size for f in frames) == raw_len
