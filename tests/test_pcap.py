"""The pcap writer: pure logic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from netpass import pcap


@given(st.lists(st.tuples(st.floats(min_value=0, max_value=4e9, allow_nan=False),
                          st.binary(min_size=14, max_size=2000)), max_size=50))
def test_round_trip(frames: list[tuple[float, bytes]]) -> None:
    back = pcap.read(pcap.encode(frames))
    assert [d for _, d in back] == [d for _, d in frames]
    for (t0, _), (t1, _) in zip(frames, back, strict=True):
        assert abs(t0 - t1) < 2e-6 or abs(t0 - t1) < 1e-6 * abs(t0) + 2e-6


def test_header_is_classic_ethernet() -> None:
    head = pcap.encode([])
    assert head[:4] == b"\xd4\xc3\xb2\xa1" and head[20:24] == b"\x01\x00\x00\x00"
