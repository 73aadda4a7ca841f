"""Liveness on a live channel: silence is judged by when bytes came."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from netpass import channel
from netpass.channel import CONTROL, PREFIX, Channel, SilenceError, Wire, _Writer

pytestmark = pytest.mark.unit


async def _pair() -> tuple[Channel, socket.socket]:
    """A live channel (no keys) and the raw socket at its other end."""
    mine, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, wire = await loop.create_connection(Wire, sock=mine)
    ch = Channel(wire, _Writer(transport, wire), peer="peer")  # type: ignore[arg-type]
    ch.start_beats()
    theirs.setblocking(False)
    return ch, theirs


def _message(body: bytes) -> bytes:
    return PREFIX.pack(1 + len(body), CONTROL) + body


def test_a_held_up_loop_does_not_take_a_live_peer_for_a_silent_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer's message comes while this process's loop is held up past
    the silence bound: when the loop runs again the timer is due too, and
    runs before the reading task.  The message is what the receiver gets."""
    monkeypatch.setattr(channel, "SILENCE_S", 0.3)

    async def main() -> tuple[int, bytes | memoryview]:
        ch, peer = await _pair()
        try:
            got = asyncio.ensure_future(ch.recv())
            await asyncio.sleep(0.05)
            peer.send(_message(b'{"op": "x"}'))
            time.sleep(0.5)  # the loop held up: no callback runs meanwhile
            return await got
        finally:
            await ch.close()
            peer.close()

    mtype, payload = asyncio.run(main())
    assert mtype == CONTROL and bytes(payload) == b'{"op": "x"}'


def test_a_silent_peer_is_still_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "SILENCE_S", 0.3)

    async def main() -> None:
        ch, peer = await _pair()
        try:
            t = time.monotonic()
            with pytest.raises(SilenceError, match="silent"):
                await ch.recv()
            assert 0.25 < time.monotonic() - t < 2
        finally:
            await ch.close()
            peer.close()

    asyncio.run(main())
