"""The source's side of the channel to the agent: the captured frames go
out in batches (zstd when it pays), the agent's messages come in and are
recorded in the session's state (``SourceState.agent_said``); a message
someone waits on (``migrated``'s answer, ``end``'s report) is queued for
:meth:`Shipper.reply`.  The first channel failure is kept: the session
reads it where it decides what happens next.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from . import wire
from .channel import BATCH, ChannelError
from .errors import NetpassError
from .srcstate import SourceState


class BatchLink(Protocol):
    """What the shipping needs of a channel (``channel.Channel``; the bench
    has one that sends nothing)."""

    def should_compress(self, mode: str, raw_bytes: int) -> bool: ...

    def compressed(self, raw_bytes: int, packed_bytes: int, seconds: float) -> None: ...

    async def send(self, mtype: int, payload: bytes | bytearray) -> None: ...


class AgentLink(BatchLink, Protocol):
    async def recv(self, timeout: float | None = None) -> tuple[int, bytes | memoryview]: ...


class Shipper:
    def __init__(self, st: SourceState, ch: BatchLink) -> None:
        self.st, self.ch = st, ch
        self.error: NetpassError | None = None  # the channel's first failure
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def ship_pending(self) -> None:
        """Every frame waiting to go, in batches of at most ``batch_frames``."""
        st = self.st
        while st.outq:
            n = min(len(st.outq), st.o.batch_frames)
            if n == len(st.outq):
                frames = list(st.outq)
                st.outq.clear()
            else:
                frames = [st.outq.popleft() for _ in range(n)]
            raw = wire.wire_size(frames)
            zstd = self.ch.should_compress(st.o.compress, raw)
            t = time.perf_counter()
            blob = wire.encode(st.seq, frames, compress=zstd)
            if zstd:
                self.ch.compressed(raw, len(blob), time.perf_counter() - t)
                st.batches_compressed += 1
            if st.o.save_pcap:
                st.unacked[st.seq] = frames
            st.seq += 1
            await self.ch.send(BATCH, blob)
            st.shipped += n

    async def ship_loop(self) -> None:
        """Ship every ``batch_interval_ms``, except while a stop is being
        settled (the frame QEMU held goes first); ends at a channel failure."""
        while True:
            try:
                if not self.st.settling:
                    await self.ship_pending()
            except ChannelError as exc:
                self.error = exc
                return
            await asyncio.sleep(self.st.o.batch_interval_ms / 1000)

    async def receive_loop(self, ch: AgentLink) -> None:
        """The agent's messages, until the channel fails."""
        while True:
            try:
                _mtype, payload = await ch.recv()
                msg = self.on_agent_message(payload)
            except ChannelError as exc:
                self.error = exc
                await self.replies.put({"op": "error", "message": str(exc), "exc": exc})
                return
            if msg is not None:
                await self.replies.put(msg)

    def on_agent_message(self, payload: bytes | memoryview) -> dict[str, Any] | None:
        """Take in one control message from the agent (``SourceState.agent_said``);
        anything malformed is a ChannelError (never another exception: the
        receiving task must not die silently)."""
        try:
            return self.st.agent_said(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ChannelError(f"the agent sent a malformed message: {exc}") from exc

    async def reply(self, op: str, timeout: float) -> dict[str, Any]:
        """The agent's answer to ``op``; a ChannelError if none comes in ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                msg = await self.replies.get()
        except TimeoutError as exc:
            raise ChannelError(f"the agent did not answer '{op}' within {timeout:.0f} s") from exc
        if msg.get("op") == "error":
            err = msg.get("exc")
            raise err if isinstance(err, ChannelError) else ChannelError(str(msg.get("message")))
        return msg
