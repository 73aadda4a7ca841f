"""The frame QEMU's reader holds after its stop, named from the shadow ring
and what netpass drained (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from netpass.stopaccount import last_read_before_stop, last_read_by_qemu

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
