"""The hold's frame size, which turns a pace in frames into the token
bucket's bytes (Hold._frame_bytes): fed qdisc counts, no kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from netpass import hold
from netpass.tc import QdiscInfo

pytestmark = pytest.mark.unit


def _hold(tmp_path: Path) -> hold.Hold:
    spec = hold.HoldSpec(session="s", tap="tap0", ifb_rx="npifb0r", ifb_tx="", burst=1578, limit=1 << 22,
                         owner_pid=1, netns=0)
    h = hold.Hold(spec, tmp_path)
    # The plug's two primers went through the RX ifb (what Primers.empty records).
    h.primers.sent["npifb0r"] = (2, len(h.primers.frames[0]) + len(h.primers.frames[1]))
    return h


def _q(backlog: int = 0, backlog_bytes: int = 0, sent: int = 0, sent_bytes: int = 0) -> QdiscInfo:
    return QdiscInfo("tbf", "1:", True, backlog_bytes=backlog_bytes, backlog_packets=backlog,
                     sent_packets=sent, sent_bytes=sent_bytes)


def test_an_empty_hold_paces_as_for_the_largest_frame(tmp_path: Path) -> None:
    """Only the plug's primers went through: they say nothing of the traffic
    (they made 789 bytes a frame, and 1442-byte frames grew the hold)."""
    h = _hold(tmp_path)
    assert h._frame_bytes(_q(sent=2, sent_bytes=1578)) == 1514


def test_a_primer_and_a_stray_frame_held_are_no_sample(tmp_path: Path) -> None:
    h = _hold(tmp_path)
    assert h._frame_bytes(_q(backlog=2, backlog_bytes=64 + 156)) == 1514  # (was 110)


def test_a_real_backlog_or_enough_sent_frames_set_the_size(tmp_path: Path) -> None:
    h = _hold(tmp_path)
    assert h._frame_bytes(_q(backlog=40, backlog_bytes=40 * 1456, sent=2, sent_bytes=1578)) == 1456
    # Then 600 frames of 100 bytes went through, the hold empty: the primers are not counted.
    assert h._frame_bytes(_q(sent=602, sent_bytes=1578 + 600 * 100)) == 100
    # A few more: too few to say, kept for the next look, where they add up.
    assert h._frame_bytes(_q(sent=612, sent_bytes=1578 + 600 * 100 + 10 * 1000)) == 100
    assert h._frame_bytes(_q(sent=622, sent_bytes=1578 + 600 * 100 + 20 * 1000)) == 1000
