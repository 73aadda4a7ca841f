"""The frame QEMU's reader holds after its stop, named from the shadow ring
and what netpass drained (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from netpass.nics import buffer_before
from netpass.stopaccount import (
    agreed_verdict,
    dropped_in_stop_window,
    fds_of_queue,
    last_read_before_stop,
    last_read_by_qemu,
)

F = [bytes([i]) * 60 for i in range(10)]


def test_nothing_drained_the_last_frame_queued() -> None:
    assert last_read_by_qemu(F[:5], []) == 4


def test_the_frame_before_the_drained_ones() -> None:
    assert last_read_by_qemu(F[:6], F[3:6]) == 2


def test_the_frame_taken_while_netpass_drained() -> None:
    # QEMU took F[4] between netpass's reads of F[3] and F[5]
    assert last_read_by_qemu(F[:7], [F[3], F[5], F[6]]) == 4


def test_a_shadow_that_does_not_end_with_the_drained_frames_names_none() -> None:
    assert last_read_by_qemu(F[:5], [F[7]]) is None
    assert last_read_by_qemu(F[:6], [F[1], F[3], F[5]]) is None  # two gaps
    assert last_read_by_qemu(F[2:5], F[2:5]) is None  # nothing before them kept
    assert last_read_by_qemu([], []) is None


@given(st.integers(1, 60), st.integers(0, 20), st.data())
def test_any_ring_and_race(before: int, after: int, data: st.DataObject) -> None:
    """QEMU read ``before`` frames before its stop; ``after`` more were in the
    ring.  After the stop QEMU takes one of them (any), or none."""
    frames = [i.to_bytes(4, "big") * 15 for i in range(before + after)]
    took = data.draw(st.none() | st.integers(before, before + after - 1)) if after else None
    drained = [f for k, f in enumerate(frames[before:], before) if k != took]
    assert last_read_by_qemu(frames, drained) == (before - 1 if took is None else took)


def test_the_last_frame_read_before_the_stop() -> None:
    assert last_read_before_stop(F[:6], F[4:6], held=False) == 3
    assert last_read_before_stop(F[:6], F[4:6], held=True) == 2  # F[3] was read after the stop
    assert last_read_before_stop(F[:6], [F[3], F[5]], held=True) == 2  # F[4], amid them
    assert last_read_before_stop(F[:2], F[:2], held=False) is None


# -- the frame QEMU's reader took while the vCPUs stopped ---------------------------------------

MIXED = [98, 64, 98, 98, 64, 98, 64, 64, 98, 98, 98, 64, 98, 64]  # frame lengths, oldest first


def guest(lengths: list[int], upto: int, hdr: int = 12) -> list[int]:
    """What the guest's used ring says after getting frames ..upto."""
    return [n + hdr for n in lengths[:upto + 1]]


def test_a_frame_the_guest_got_is_not_sent_again() -> None:
    last = len(MIXED) - 1
    assert dropped_in_stop_window(MIXED, last, False, guest(MIXED, last)) == (True, None)


def test_a_frame_dropped_at_the_stop_is_named() -> None:
    last = len(MIXED) - 1
    assert dropped_in_stop_window(MIXED, last, False, guest(MIXED, last - 1)) == (True, last)


def test_with_a_held_frame_the_one_before_it_is_the_candidate() -> None:
    last = len(MIXED) - 1  # the frame QEMU's reader holds
    assert dropped_in_stop_window(MIXED, last, True, guest(MIXED, last - 2)) == (True, last - 1)
    assert dropped_in_stop_window(MIXED, last, True, guest(MIXED, last - 1)) == (True, None)


def test_either_header_size_fits() -> None:
    last = len(MIXED) - 1
    assert dropped_in_stop_window(MIXED, last, False, guest(MIXED, last - 1, hdr=10)) == (True, last)


def test_frames_of_one_size_do_not_decide() -> None:
    same = [98] * 40
    assert dropped_in_stop_window(same, 39, False, guest(same, 38)) == (False, None)


def test_a_window_that_fits_neither_does_not_decide() -> None:
    last = len(MIXED) - 1
    used = guest(MIXED, last)
    used[-3] += 1500  # a frame over several buffers, or one QEMU filtered out
    assert dropped_in_stop_window(MIXED, last, False, used) == (False, None)


def test_a_short_window_does_not_decide() -> None:
    short = MIXED[:5]
    assert dropped_in_stop_window(short, 4, False, guest(short, 3)) == (False, None)


@given(st.lists(st.sampled_from([60, 64, 98, 1514]), min_size=12, max_size=60), st.booleans(), st.booleans())
def test_never_a_wrong_verdict(lengths: list[int], held: bool, lost: bool) -> None:
    """Whatever the sizes: a verdict, when given, is the truth."""
    last = len(lengths) - 1
    cand = last - 1 if held else last
    truth = cand if lost else None
    decided, dropped = dropped_in_stop_window(lengths, last, held, guest(lengths, cand - 1 if lost else cand))
    assert not decided or dropped == truth


# -- ... and the guest's last buffer, when the lengths cannot tell ------------------------------

def probe(seq: int, size: int = 98) -> bytes:
    """Frames of one size that differ past their headers (ping's sequence)."""
    head = bytes.fromhex("525400123456026e700000010800") + bytes(20)
    return (head + seq.to_bytes(4, "big")).ljust(size, b"p")


SAME = [probe(i) for i in range(20)]


def buffer(frame: bytes, hdr: int = 12, size: int = 128) -> bytes:
    """The guest's buffer's first ``size`` bytes: the header QEMU wrote, the
    frame, then whatever the buffer held before."""
    return (bytes(hdr) + frame + b"\xa5" * size)[:size]


def test_one_size_the_last_buffer_tells() -> None:
    lens = list(map(len, SAME))
    last = len(SAME) - 1
    assert dropped_in_stop_window(lens, last, False, guest(lens, last), SAME, buffer(SAME[last])) == (True, None)
    assert dropped_in_stop_window(lens, last, False, guest(lens, last - 1), SAME,
                                  buffer(SAME[last - 1])) == (True, last)
    assert dropped_in_stop_window(lens, last, True, guest(lens, last - 2), SAME,
                                  buffer(SAME[last - 2], hdr=10)) == (True, last - 1)


def test_a_reused_buffer_or_frames_that_begin_alike_tell_nothing() -> None:
    lens = list(map(len, SAME))
    last = len(SAME) - 1
    assert dropped_in_stop_window(lens, last, False, guest(lens, last), SAME, buffer(SAME[3])) == (False, None)
    twins = SAME[:-1] + [SAME[-2]]
    assert dropped_in_stop_window(lens, last, False, guest(lens, last), twins, buffer(twins[-1])) == (False, None)
    assert dropped_in_stop_window(lens, last, False, guest(lens, last), SAME, buffer(SAME[last])[:40]) == \
        (False, None)  # too few bytes to go by


def test_a_last_buffer_against_the_lengths_undoes_their_verdict() -> None:
    last = len(MIXED) - 1
    frames = [probe(i, n) for i, n in enumerate(MIXED)]
    assert dropped_in_stop_window(MIXED, last, False, guest(MIXED, last), frames, buffer(frames[last])) == \
        (True, None)
    assert dropped_in_stop_window(MIXED, last, False, guest(MIXED, last), frames, buffer(frames[last - 1])) == \
        (False, None)


@given(st.lists(st.sampled_from([60, 98, 1514]), min_size=12, max_size=40), st.booleans(), st.booleans(),
       st.sampled_from([10, 12]), st.booleans())
def test_never_a_wrong_verdict_with_the_last_buffer(lengths: list[int], held: bool, lost: bool, hdr: int,
                                                    reused: bool) -> None:
    """The guest's last buffer holds the last frame it got (or, reused,
    something else): a verdict, when given, is still the truth."""
    frames = [probe(i, n) for i, n in enumerate(lengths)]
    last = len(lengths) - 1
    cand = last - 1 if held else last
    got = cand - 1 if lost else cand
    tail = buffer(probe(10_000 + got), hdr) if reused else buffer(frames[got], hdr)
    decided, dropped = dropped_in_stop_window(lengths, last, held, guest(lengths, got, hdr), frames, tail)
    assert not decided or dropped == (cand if lost else None)
    if len(set(lengths)) == 1 and not reused and got >= 0:
        assert decided


def back_to_back(addrs: list[int], length: int = 1536) -> list[tuple[int, int]]:
    return [(a, length) for a in addrs]


def test_the_buffer_before_lies_one_stride_back() -> None:
    assert buffer_before(back_to_back([0x10000, 0x10600, 0x10c00])) == 0x10000 - 0x600
    assert buffer_before(back_to_back([0x10000, 0x10600, 0x10c00, 0x50000])) == 0xfa00  # (only the first three)
    assert buffer_before(back_to_back([0x10000, 0x10600, 0x48000])) == 0xfa00  # (the second ends its page)
    # the first ends its page: its length takes the page's rest
    assert buffer_before([(0x17a00, 0x600 + 0x200), (0x48000, 0x600), (0x48600, 0x600)]) == 0x17400


def test_no_buffer_before_when_the_strides_do_not_tell() -> None:
    assert buffer_before(back_to_back([0x10000, 0x10600])) is None  # (too few)
    assert buffer_before(back_to_back([0x10000, 0x10600, 0x10d00], 0x500)) is None  # (a new size, or a new page)
    assert buffer_before(back_to_back([0x10000, 0x40000, 0x70000])) is None  # (not one page's buffers)
    assert buffer_before(back_to_back([0x10600, 0x10000, 0xfa00])) is None  # (downward)
    assert buffer_before(back_to_back([0x10000, 0x10040, 0x10080], 0x40)) is None  # (smaller than a frame)
    assert buffer_before(back_to_back([0x200, 0x800, 0xe00], 0x600)) is None  # (before the start of memory)
    assert buffer_before([(0x17a00, 0x600), (0x48000, 0x600), (0x48600, 0x600)]) is None  # (a new page, no sign)


@given(st.integers(0, 1 << 40), st.sampled_from([1536, 1600, 2048, 4096]), st.integers(0, 2),
       st.integers(-4096, 4096))
def test_a_buffer_before_is_one_buffer_back_or_none(base: int, stride: int, bend: int, shift: int) -> None:
    """Buffers carved back to back name the one before them; moved about,
    they name one a stride seen among them back, or none."""
    bufs = [(base + k * stride, stride) for k in range(3)]
    assert buffer_before(bufs) == (base - stride if base >= stride else None)
    bufs[bend] = (bufs[bend][0] + shift, stride)
    got = buffer_before(bufs)
    assert got is None or got in {bufs[0][0] - (bufs[1][0] - bufs[0][0]), bufs[0][0] - (bufs[2][0] - bufs[1][0])}


def test_the_fds_tried_for_a_queue_agree_or_tell_nothing() -> None:
    assert agreed_verdict({"dropped"}) is True and agreed_verdict({"got"}) is False
    # another queue's fd (its drained frames are not this queue's) has no say
    assert agreed_verdict({"dropped", "mismatch"}) is True and agreed_verdict({"got", "mismatch"}) is False
    for told in ({"got", "dropped"}, {"got", "untold"}, {"untold"}, {"mismatch"}, set()):
        assert agreed_verdict(told) is None


def test_the_fd_that_read_a_queues_last_frames_is_that_queues() -> None:
    shadow = [probe(i) for i in range(10)]
    other = [probe(100 + i, 60) for i in range(3)]
    assert fds_of_queue(shadow, {7: other, 8: shadow[-2:]}, [7, 8]) == [8]
    assert fds_of_queue(shadow, {7: other, 8: [shadow[-1]]}, [7, 8]) == [8]
    # none read one of its frames: either may be its (neither names a frame)
    assert fds_of_queue(shadow, {7: other}, [7, 8]) == [7, 8]
    assert fds_of_queue(shadow, {}, [7, 8]) == [7, 8]
