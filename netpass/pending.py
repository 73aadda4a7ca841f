"""The frames an agent keeps for its VM until the VM's ring has room:
compact, in order, accounted in bytes.  Pure but for the ring it offers
them to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .packet import TxRing


def retained(body: memoryview) -> int:
    """The bytes that keeping ``body`` keeps alive: the whole buffer it views."""
    obj = body.obj
    try:
        return max(len(obj), body.nbytes)  # type: ignore[arg-type]
    except TypeError:
        return body.nbytes


class Pending:
    """Frames waiting for the VM, in order, stored compactly: each accepted
    batch's records (virtio-net header + frame) back to back in one buffer
    with an array of offsets, so a cached frame costs its bytes and 4 more,
    not a Python object each (a 1 GiB cap of 64-byte frames is 14 million).

    :meth:`add` and :meth:`add_span` return what a chunk costs in memory:
    its buffer (all of it: a received message kept whole has its batch
    header, per-record fields and MAC too) and its offsets; :meth:`pop`
    returns what it frees, the chunk's overhead with its last record."""

    __slots__ = ("chunks", "frames")

    def __init__(self) -> None:
        self.chunks: deque[list[Any]] = deque()  # [body, offsets, position, overhead]
        self.frames = 0

    def __len__(self) -> int:
        return self.frames

    def add(self, records: Sequence[bytes | memoryview]) -> int:
        if not records:
            return 0
        offs = np.zeros(len(records) + 1, np.uint32)
        np.cumsum(np.fromiter(map(len, records), np.uint32, len(records)), out=offs[1:])
        self.chunks.append([memoryview(b"".join(records)), offs, 0, offs.nbytes])
        self.frames += len(records)
        return int(offs[-1]) + offs.nbytes

    def add_span(self, body: memoryview, offsets: Sequence[int] | npt.NDArray[np.int64]) -> int:
        """Records already back to back in ``body`` (a received batch kept
        whole): ``body[offsets[i]:offsets[i + 1]]``, no copy."""
        if len(offsets) < 2:
            return 0
        offs = np.asarray(offsets, np.uint32)
        cost = retained(body) + offs.nbytes
        self.chunks.append([body, offs, 0, cost - (int(offs[-1]) - int(offs[0]))])
        self.frames += len(offs) - 1
        return cost

    def replay(self, ring: TxRing, n: int) -> tuple[int, int]:
        """Offer the tap up to ``n`` of the oldest records, from the oldest
        chunk only; (how many were offered, how many the tap took).  The
        caller pops what was taken."""
        body, offs, pos, _overhead = self.chunks[0]
        k = min(n, len(offs) - 1 - pos)
        return k, ring.send_span(body, offs, pos, pos + k)

    def pop(self, n: int) -> int:
        """Forget the ``n`` oldest records; their bytes."""
        freed = 0
        while n and self.chunks:
            chunk = self.chunks[0]
            body, offs, pos, overhead = chunk
            k = min(n, len(offs) - 1 - pos)
            freed += int(offs[pos + k]) - int(offs[pos])
            chunk[2] = pos + k
            n -= k
            self.frames -= k
            if chunk[2] == len(offs) - 1:
                self.chunks.popleft()
                freed += overhead
        return freed

    def clear(self) -> None:
        self.chunks.clear()
        self.frames = 0
