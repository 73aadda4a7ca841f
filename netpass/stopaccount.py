"""Which frame QEMU's reader of a tap queue holds after the VM stopped.
Pure: no kernel, no QMP.

After its stop QEMU reads one more frame from each queue whose ring holds
one, cannot hand it to the stopped guest, and keeps it until the source is
gone: lost, unless netpass has a copy.  A reader that already held a frame
before the stop (the guest had no buffer for it) reads nothing more.  Either
way the frame a holding reader keeps is the last one it read.

netpass knows, for each queue, the frames the host queued toward it up to
the park (its shadow ring, oldest first) and the real frames it read from
the ring itself after the stop (drained, in order).  QEMU had read every
frame before the drained ones, and perhaps one in their midst (its reader
and netpass's raced for the ring after the stop).  So the shadow ends with
the drained frames and at most one more among them; that one, or else the
frame just before them, is the one QEMU read last.
"""

from __future__ import annotations

from collections.abc import Sequence


def last_read_by_qemu(shadow: Sequence[bytes], drained: Sequence[bytes]) -> int | None:
    """Index in ``shadow`` of the last frame QEMU read; None when the shadow
    does not end with ``drained`` (give or take that one frame), or holds
    nothing before them: then the copy cannot name it."""
    i, j = len(shadow) - 1, len(drained) - 1
    skipped: int | None = None
    while j >= 0:
        if i < 0:
            return None
        if shadow[i] == drained[j]:
            i, j = i - 1, j - 1
        elif skipped is None:
            skipped, i = i, i - 1  # the one QEMU took while netpass drained
        else:
            return None
    if skipped is not None:
        return skipped
    return i if i >= 0 else None


def last_read_before_stop(shadow: Sequence[bytes], drained: Sequence[bytes], held: bool) -> int | None:
    """Index in ``shadow`` of the last frame QEMU read before its stop: the
    one it held for want of a guest buffer, if it held one then (it purges
    that at the stop, and its reader then takes the next).  ``held``: its
    reader also holds a frame it read after the stop."""
    if last_read_by_qemu(shadow, drained) is None:
        return None
    i = len(shadow) - len(drained) - (2 if held else 1)
    return i if i >= 0 else None


# A window of the guest's receive queue shorter than this says too little:
# netpass does not decide on it.
MIN_EVIDENCE = 8
# QEMU writes a virtio-net header before each frame in the guest's buffer:
# 12 bytes (virtio 1.0, or mergeable buffers), else 10.
GUEST_HEADERS = (12, 10)


def _ends_with(lengths: Sequence[int], end: int, used: Sequence[int]) -> bool:
    """Whether the guest's last buffers (``used``: the lengths QEMU wrote,
    oldest first) are the frames ``lengths[..end]``, each with one header."""
    m = min(len(used), end + 1)
    if m < MIN_EVIDENCE:
        return False
    return any(all(used[-1 - j] == lengths[end - j] + hdr for j in range(m)) for hdr in GUEST_HEADERS)


# The fewest bytes of a frame the guest's last buffer must show to be
# taken for it: an Ethernet, IPv4 and UDP header.
MIN_TAIL = 42


def holds_frame(tail: bytes, frame: bytes) -> bool:
    """Whether a guest buffer's first bytes (``tail``: the virtio-net header
    QEMU wrote, then the frame) are ``frame``'s, as far as both go."""
    for hdr in GUEST_HEADERS:
        m = min(len(tail) - hdr, len(frame))
        if m >= MIN_TAIL and tail[hdr:hdr + m] == frame[:m]:
            return True
    return False


def _tail_tells(frames: Sequence[bytes], cand: int, tail: bytes) -> bool | None:
    """From the guest's last buffer's bytes: True if it holds the frame
    before ``cand`` and not ``cand`` (so QEMU dropped ``cand``), False if
    the other way round, None if it cannot tell (both, or neither: the
    guest reused the buffer, or the two frames begin alike)."""
    got = holds_frame(tail, frames[cand])
    lost = cand >= 1 and holds_frame(tail, frames[cand - 1])
    return None if got == lost else lost


def dropped_in_stop_window(lengths: Sequence[int], last_read: int, held: bool,
                           used: Sequence[int], frames: Sequence[bytes] | None = None,
                           tail: bytes | None = None) -> tuple[bool, int | None]:
    """After QEMU's own stop: whether its reader took a frame while the
    vCPUs stopped, which QEMU then dropped (it had stopped the VM's run
    state, so the frame could only be queued, and the stop's flush threw
    it away).  That frame is the one before the frame its reader holds
    (``held``), or else the last it read (``last_read``, an index in the
    shadow, whose frames' ``lengths`` these are).

    The guest's receive queue tells: ``used`` are the lengths QEMU wrote
    into its last buffers.  If they end with that frame, the guest has it;
    if they end one frame earlier, QEMU dropped it.  Returns (decided, the
    index of the dropped frame or None).  Not decided when both fit (frames
    of one size), when neither does (a frame over several buffers, one
    QEMU filtered out), or when the window is short.

    ``tail``, the first bytes of the guest's last buffer, and ``frames``,
    the shadow's frames, decide when both fit (frames of one size), and
    undo a decision they contradict."""
    cand = last_read - 1 if held else last_read
    if cand < 0:
        return False, None
    got = _ends_with(lengths, cand, used)
    lost = _ends_with(lengths, cand - 1, used)
    told = _tail_tells(frames, cand, tail) if frames is not None and tail is not None else None
    if got == lost:
        if not got or told is None:  # (neither fits: the window is odd, and so is its last buffer)
            return False, None
        lost = told
    elif told is not None and told != lost:
        return False, None
    return True, (cand if lost else None)


def agreed_verdict(told: set[str]) -> bool | None:
    """What the fds tried for one queue agree the guest's used ring told
    (each fd's kind, from ``srcsettle``: "dropped", "got", "untold" or
    "mismatch"): True if QEMU dropped the frame, False if the guest has it,
    None if they disagree or none told.  An fd whose drained frames the
    queue's shadow does not end with ("mismatch") is another queue's, and
    has no say."""
    says = told - {"mismatch"}
    if says == {"dropped"}:
        return True
    if says == {"got"}:
        return False
    return None


def fds_of_queue(shadow: Sequence[bytes], drained: dict[int, list[bytes]], fds: Sequence[int]) -> list[int]:
    """Which of a NIC's ``fds`` may be the queue whose ``shadow`` this is,
    when its own fd is not known: one that read frames after the stop that
    the shadow ends with (``drained``: per fd) is the queue's, since a
    frame queued toward a queue is read from its fd only.  If none did,
    any may be (an fd that read nothing names nothing)."""
    own = [f for f in fds if drained.get(f) and last_read_by_qemu(shadow, drained[f]) is not None]
    return own or list(fds)
