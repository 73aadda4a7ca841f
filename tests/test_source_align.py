"""The source's overflow recovery (_align): pure logic, a fake shadow.

The lab test (test_lab_netpass.py, the burst) runs it for real with a tap
ring that overflows.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netpass import links
from netpass.nics import Nic
from netpass.source import MigrateOptions, SourceNic, SourceSession

VM = bytes.fromhex("525400000001")


def frame(n: int) -> bytes:
    return VM + bytes.fromhex("020000000009") + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(42)


class FakeShadow:
    """What the shadow socket saw, in order, with running indexes."""

    def __init__(self, frames: list[bytes], first: int = 100) -> None:
        self.frames: deque[tuple[int, bytes, bytes]] = deque(
            (first + i, bytes(10), f) for i, f in enumerate(frames))
        self.seen = first + len(frames)
        self.pulls = 0
        self.dropped = 0

    def pull(self) -> int:
        self.pulls += 1
        return 0


def session(shadow: Any, expect: int) -> tuple[SourceSession, SourceNic]:
    sess = SourceSession(MigrateOptions(qmp="q", uri="u", dest_agent="a:1", dest_qmp="d", token=b"t" * 32))
    sn = SourceNic(index=0, nic=Nic(mac="52:54:00:00:00:01", tap="tap0"), fds=[3], hdr_size=10,
                   shadow=shadow, mac_bytes=VM, expect=expect)
    sess.nics.append(sn)
    return sess, sn


def drain(sess: SourceSession, sn: SourceNic, read: list[bytes]) -> list[bytes]:
    for data in read:
        if sn.expect is not None:  # as _on_readable does
            sess._align(sn, data)
        sess._capture(sn, bytes(10), data)
    return [f.data for f in sess.cache]


def tun_dropped(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The tap's tx_dropped since the stop."""
    monkeypatch.setattr(links, "tx_dropped", lambda tap: n)


def test_frames_the_ring_dropped_are_caught_in_their_place(monkeypatch: pytest.MonkeyPatch) -> None:
    tun_dropped(monkeypatch, 5)
    sent = [frame(i) for i in range(10)]
    read = [sent[i] for i in (0, 1, 4, 5, 9)]  # 2, 3, 6, 7, 8 dropped by a full ring
    sess, sn = session(FakeShadow(sent), expect=100)
    assert drain(sess, sn, read) == sent
    assert sn.overflow_recovered == 5 and sn.expect == 110 and not sess.notes


def test_gaps_tun_did_not_drop_are_not_recovered(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a cancel QEMU reads the ring again: its reads are gaps too, and
    the VM already has those frames."""
    tun_dropped(monkeypatch, 0)
    sent = [frame(i) for i in range(6)]
    sess, sn = session(FakeShadow(sent), expect=100)
    assert drain(sess, sn, [sent[0], sent[3], sent[5]]) == [sent[0], sent[3], sent[5]]
    assert sn.overflow_recovered == 0


def test_only_as_many_as_tun_dropped_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    tun_dropped(monkeypatch, 2)  # 1 was read by QEMU just after the stop, 2 and 3 dropped
    sent = [frame(i) for i in range(5)]
    sess, sn = session(FakeShadow(sent), expect=100)
    assert drain(sess, sn, [sent[0], sent[4]]) == [sent[0], sent[2], sent[3], sent[4]]


def test_a_long_gap_is_recovered_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    tun_dropped(monkeypatch, 3000)  # a little more than this gap (2998): all of it
    sent = [frame(i) for i in range(3000)]
    sess, sn = session(FakeShadow(sent), expect=100)
    assert drain(sess, sn, [sent[0], sent[2999]]) == sent


def test_nothing_dropped_nothing_added() -> None:
    sent = [frame(i) for i in range(50)]
    sess, sn = session(FakeShadow(sent), expect=100)
    assert drain(sess, sn, sent) == sent
    assert sn.overflow_recovered == 0


def test_frames_before_the_expected_index_are_not_recovered() -> None:
    sent = [frame(i) for i in range(6)]  # 0, 1 were QEMU's reads before the drain began
    sess, sn = session(FakeShadow(sent), expect=102)
    assert drain(sess, sn, sent[2:]) == sent[2:]


def test_a_frame_missing_from_the_shadow_stops_the_recovery_and_says_so() -> None:
    sent = [frame(i) for i in range(4)]
    shadow = FakeShadow(sent)
    sess, sn = session(shadow, expect=100)
    assert drain(sess, sn, [sent[0], frame(99), sent[3]]) == [sent[0], frame(99), sent[3]]
    assert sn.expect is None and shadow.pulls == 1
    assert any("lost track" in n for n in sess.notes)


def test_shadow_that_lost_its_head_is_not_trusted() -> None:
    sent = [frame(i) for i in range(4)]
    sess, sn = session(FakeShadow(sent, first=105), expect=100)  # 100..104 evicted
    drain(sess, sn, [sent[2]])
    assert sn.overflow_recovered == 0 and sn.expect is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["read", "dropped", "runt", "own"]), min_size=1, max_size=700),
       st.integers(1, 300))
def test_a_round_at_once_equals_frame_by_frame(kinds: list[str], chunk: int) -> None:
    """_take's one-go path for the usual round and the per-frame path give
    the same cache, queue and counts, whatever the ring dropped or held."""
    monkeypatch = pytest.MonkeyPatch()
    sent, read = [], []
    for i, kind in enumerate(kinds):
        f = frame(i)
        if kind == "runt":
            f = f[:10]
        elif kind == "own":
            f = bytes.fromhex("ffffffffffff") + VM + f[12:]
        sent.append(f)
        if kind != "dropped":
            read.append(f)
    monkeypatch.setattr(links, "tx_dropped", lambda tap: kinds.count("dropped"))
    try:
        ref, rsn = session(FakeShadow(sent), expect=100)
        for data in read:  # the per-frame path, as before the one-go path existed
            if rsn.expect is not None:
                ref._align(rsn, data)
            ref._capture(rsn, bytes(10), data)
        fast, fsn = session(FakeShadow(sent), expect=100)
        for at in range(0, len(read), chunk):
            fast._take(fsn, [bytes(10) + d for d in read[at:at + chunk]], 10)
    finally:
        monkeypatch.undo()

    def seen(sess: SourceSession, sn: SourceNic) -> tuple[Any, ...]:
        return ([(f.nic, f.vnet_hdr, f.data) for f in sess.cache], [f.data for f in sess.outq],
                sess.cache_bytes, sn.captured, sn.bytes_captured, sn.expect, sn.overflow_recovered,
                sn.dropped, sn.own_frames, sess.notes)

    assert seen(fast, fsn) == seen(ref, rsn)
