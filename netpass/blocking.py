"""Kernel work that can wait long, kept off the event loop.

Some steps of the arm wait in the kernel for reasons that have nothing to do
with netpass: a packet ring's setup waits for an RCU grace period
(``packet_set_ring`` calls ``synchronize_net``), and replacing a file on an
ext4 mounted with ``discard`` waits for the disk.  On a loaded host these
waits were measured at 0.3-1.7 s each, 6 s for one arm in all.  Run on the
event loop, they stop the channel's beats, and the agent, hearing nothing
for its silence limit, gives the session up.

:func:`off_loop` runs such a step in a worker thread.  A cancellation does
not abandon it: the step registers the undo of each change it makes, and
those registrations must all land before the caller unwinds them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread; a cancellation waits for it to end."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(fut)
            break
        except asyncio.CancelledError:
            if fut.done():
                raise
            cancelled = True  # the thread runs on: wait for it, then unwind
    if cancelled:
        raise asyncio.CancelledError
    return result
