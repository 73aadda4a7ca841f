"""A step that waits in the kernel does not stop the event loop, and a
cancellation does not abandon it half done."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable

import pytest

from netpass.blocking import off_loop

pytestmark = pytest.mark.unit


async def _ticks_during(fn: Awaitable[object]) -> int:
    """How often a 10 ms ticker ran while ``fn`` (a coroutine) ran."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await fn
    t.cancel()
    return ticks


def test_the_loop_runs_while_a_step_blocks() -> None:
    async def main() -> tuple[int, int]:
        async def on_loop() -> None:
            time.sleep(0.3)  # what a grace period does to the loop

        return await _ticks_during(on_loop()), await _ticks_during(off_loop(time.sleep, 0.3))

    held, free = asyncio.run(main())
    assert held <= 1
    assert free >= 15  # some 30 ticks of 10 ms; a busy host makes fewer


def test_a_cancelled_step_is_waited_for_then_the_cancel_goes_on() -> None:
    done = threading.Event()
    registered: list[str] = []

    def step() -> str:
        time.sleep(0.2)
        registered.append("undo")  # lands after the cancel was asked
        done.set()
        return "ok"

    async def main() -> None:
        task = asyncio.create_task(off_loop(step))
        await asyncio.sleep(0.05)
        task.cancel()
        task.cancel()  # twice: still waited for
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done.is_set() and registered == ["undo"]

    asyncio.run(main())


def test_a_step_s_error_reaches_the_caller() -> None:
    def step() -> None:
        raise OSError(5, "the kernel said no")

    with pytest.raises(OSError, match="said no"):
        asyncio.run(off_loop(step))
    assert asyncio.run(off_loop(lambda a, b: a + b, 2, 3)) == 5
