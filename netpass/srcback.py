"""The migration failed after the park: every parked frame goes back to
the source VM, in order, then the park ends.

QEMU resumes the VM by itself when a migration it stopped it for fails.
Frames keep arriving in the park meanwhile and are given back after the
older ones, for a few rounds, until a round brings few; then the park
ends, and what it held last follows (those may come after newer frames:
counted as ``straggler_frames``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from . import tapfd, wire
from .errors import KernelError
from .srcstate import SourceState

ROUNDS = 4  # rounds of frames that came meanwhile, before the park ends
FEW = 16  # a round that brings fewer than this ends the park


async def return_parked(st: SourceState, capture: Callable[[], None]) -> None:
    """``capture``: read what the parking taps hold now into ``st.cache``."""
    given = 0
    for _round in range(ROUNDS):
        capture()
        if len(st.cache) - given < FEW:
            break  # few enough arrived meanwhile: end the park now
        given = await _give(st, st.cache, given)
    for sn in st.nics:
        sn.park.unpark()
    await asyncio.sleep(0.001)  # a frame may be on its way into the parking tap
    capture()
    st.straggler_frames = len(st.cache) - given
    await _give(st, st.cache, given)
    st.returned_to_source = len(st.cache)
    st.cache.clear()
    st.cache_bytes = 0


async def _give(st: SourceState, frames: list[wire.Frame], start: int) -> int:
    """Frames from ``start`` on into their VM's ring, within its room:
    chunks of at most 64, each read by QEMU before the next."""
    fds = {sn.index: sn.fds for sn in st.nics}
    i = start
    while i < len(frames):
        chunk_end = min(len(frames), i + 64)
        for f in frames[i:chunk_end]:
            full_since = None
            while not st.nics[f.nic].own.send(f.vnet_hdr or bytes(wire.VNET_HDR_LEN), f.data):
                full_since = full_since or time.monotonic()
                if time.monotonic() - full_since > 2.0:
                    raise KernelError(f"tap {st.nics[f.nic].nic.tap} stayed full for 2 s: "
                                      "frames could not be given back")
                await asyncio.sleep(0.001)
        i = chunk_end
        deadline = time.monotonic() + 2.0
        while any(tapfd.readable(fds[n]) for n in fds) and time.monotonic() < deadline:
            await asyncio.sleep(0.0005)
    return i
