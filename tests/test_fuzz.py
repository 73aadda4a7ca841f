"""Fuzz targets: the batch decoder and the control messages, each end's.

Run for a bounded number of examples (NETPASS_FUZZ_EXAMPLES): 300 by
default, so that ``pytest -m unit`` takes seconds; 1,500 in CI
(scripts/test), some seconds each.  Hypothesis keeps what it finds in
tests/hypothesis-db, in the repository: a failure found once, anywhere, is
tried first ever after.  The only outcomes allowed are a result or a clean
NetpassError; and no call raises the peak memory by more than a bound (a decoder that
believed a declared size took up to gigabytes)."""

from __future__ import annotations

import itertools
import json
import os
import resource
import struct
from pathlib import Path
from typing import Any

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from netpass import channel, wire
from netpass.agent import SessionError, _control, check_open
from netpass.channel import CONTROL, ChannelError
from netpass.errors import NetpassError
from netpass.srcship import Shipper
from netpass.srcstate import MigrateOptions, SourceState

FUZZ = settings(database=DirectoryBasedExampleDatabase(str(Path(__file__).parent / "hypothesis-db")),
                max_examples=int(os.environ.get("NETPASS_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
# What one call may add to the process's peak RSS: a batch decompresses to
# 16 MiB at most (wire.MAX_RAW); a decoder that believed a declared size
# took up to gigabytes.  (Measured per call: hypothesis itself keeps some
# 36 KB per example it tried, which a bound over the whole run would count.)
CALL_BOUND_MIB = 48


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bounded(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, checking it did not raise the peak RSS by more than CALL_BOUND_MIB."""
    before = _peak_mib()
    try:
        return fn(*args)
    finally:
        grown = _peak_mib() - before
        assert grown < CALL_BOUND_MIB, f"one call raised the peak RSS by {grown:.0f} MiB"


def craft(count: int, body: bytes, compress: bool, raw_len: int | None = None, declared: int | None = None,
          seq: int = 0) -> bytes:
    """A batch with any header values, and a body whose checksum is right:
    the fuzzer gets past the checksum into every later check."""
    packed = body
    if compress:
        cctx = zstandard.ZstdCompressor(write_content_size=declared is None)
        packed = cctx.compress(body)
        if declared is not None:  # a frame header that lies about its content size
            params = zstandard.ZstdCompressionParameters(write_content_size=True)
            packed = zstandard.ZstdCompressor(compression_params=params).compress(body)
            packed = _declare(packed, declared)
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.FLAG_ZSTD if compress else 0, 0, seq, count,
                            len(body) if raw_len is None else raw_len, len(packed), wire._check(body))
    return head + packed


def _declare(frame: bytes, size: int) -> bytes:
    """Rewrite a zstd frame's declared content size (an 8-byte field)."""
    fhd = frame[4]
    if fhd >> 6 != 3:
        return frame
    single = bool(fhd & 0x20)
    dict_id = (0, 1, 2, 4)[fhd & 3]
    at = 5 + (0 if single else 1) + dict_id
    return frame[:at] + struct.pack("<Q", size) + frame[at + 8:]


@st.composite
def columns_and_records(draw: Any) -> tuple[int, bytes]:
    """A body built field by field, each field sometimes wrong."""
    count = draw(st.integers(0, 40))
    lens = draw(st.lists(st.one_of(st.integers(14, 200), st.integers(0, 2**32 - 1)),
                         min_size=count, max_size=count))
    nics = draw(st.binary(min_size=count, max_size=count))
    hdrs = bytes(draw(st.sampled_from([0, 10, 10, 10, 3])) for _ in range(count))
    ts = draw(st.binary(min_size=4 * count, max_size=4 * count))
    payload = b"".join(draw(st.binary(min_size=min(n, 300) + h, max_size=min(n, 300) + h))
                       for n, h in zip(lens, hdrs, strict=True))
    payload += draw(st.binary(max_size=8))  # sometimes garbage after the records
    body = ts + struct.pack(f"<{count}I", *lens) + nics + hdrs + payload
    return count, body


@FUZZ
@given(st.one_of(st.binary(max_size=2048),
                 st.builds(lambda cb, z, d, n: craft(cb[0] if n is None else n, cb[1], z, declared=d),
                           columns_and_records(), st.booleans(),
                           st.one_of(st.none(), st.integers(0, 2**63)),
                           st.one_of(st.none(), st.integers(0, 2**32 - 1)))),
       st.integers(1, 8))
def test_the_decoder_takes_anything(blob: bytes, nic_count: int) -> None:
    try:
        batch = bounded(wire.decode, blob, nic_count)
    except wire.WireError:
        return
    # What it accepts is consistent: every record inside the body, in order.
    assert len(batch.nics) == len(batch.hdr_lens) == len(batch.offsets) - 1
    assert all(n < nic_count for n in batch.nics)
    assert all(int(a) <= int(b) for a, b in itertools.pairwise(batch.offsets))
    assert int(batch.offsets[-1]) == len(batch.body)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=5),
                    max_leaves=30)
FIELDS = st.fixed_dictionaries({}, optional={
    "op": st.sampled_from(["open", "ack", "fed", "end", "migrated", "prepare", "stopped", "abort", "x"]) | JSON,
    "dest_qmp": JSON | st.text(max_size=50), "macs": JSON | st.lists(st.text(max_size=20), max_size=3),
    "vm": JSON, "resume": JSON, "strict": JSON, "accepted": JSON, "dropped": JSON, "fed": JSON,
    "skipped": JSON, "seq": JSON, "timeout": JSON, "session": JSON})


def _as_bytes(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


@FUZZ
@given(st.one_of(st.binary(max_size=512), FIELDS.map(_as_bytes), JSON.map(_as_bytes),
                 st.integers(1, 20_000).map(lambda n: b"[" * n)))
def test_control_messages_at_the_agent(payload: bytes) -> None:
    try:
        msg = bounded(_control, payload, CONTROL)
    except SessionError:
        return
    try:
        check_open(msg)
    except SessionError:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=512), FIELDS.map(_as_bytes), JSON.map(_as_bytes),
                 st.integers(1, 20_000).map(lambda n: b"{\"a\":" * n)))
def test_control_messages_at_the_source(payload: bytes) -> None:
    sess = SourceState(MigrateOptions(qmp="-", uri="-", dest_agent="-", dest_qmp="-", token=b"-"), "fuzz")
    try:
        bounded(Shipper(sess, None).on_agent_message, payload)  # type: ignore[arg-type]  # (never sends)
    except ChannelError:
        pass
    assert sess.agent_fed >= 0 and sess.agent_accepted >= 0 and sess.agent_dropped >= 0


@FUZZ
@given(st.one_of(st.binary(max_size=512), JSON.map(_as_bytes)))
def test_handshake_messages(payload: bytes) -> None:
    try:
        obj = bounded(channel._json, payload)
        channel._hexfield(obj, "nonce", 32)
    except NetpassError:
        pass
