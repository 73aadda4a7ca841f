"""The authenticated channel between ``netpass migrate`` and an agent.

TCP (optionally TLS), one message at a time::

    length  I   bytes after this field (type + payload + mac)
    type    B   HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, CONTROL, BATCH, BEAT
    payload     JSON for control messages, a wire batch for BATCH
    mac     16  HMAC-SHA256, truncated, once the handshake is done

Handshake (the token itself never crosses the wire):

    client -> HELLO     {proto, nonce_c}
    agent  -> CHALLENGE {nonce_s, proof_s = HMAC(token, "server" | nonce_c | nonce_s)}
    client checks proof_s (so the agent is authenticated too), then
    client -> AUTH      {proof_c = HMAC(token, "client" | nonce_c | nonce_s)}
    agent  -> AUTH_OK, or ERROR {code: "auth"} and closes

After it, each direction authenticates every message with its own key,
``HMAC(token, "c2s"|"s2c" | nonce_c | nonce_s)``: the MAC is AES-256-GMAC
(AES-GCM with no plaintext and the payload as associated data) under that
key, with the message counter and type as the 12-byte nonce.  A replayed,
reordered, injected or altered message fails its MAC; one replayed from
another session too, since the keys differ.  Keys are per session and per
direction and the counter never repeats, so no nonce is ever used twice
under one key, which GCM requires.  (Protocol 1 used a truncated
HMAC-SHA256: 1.8 GB/s here, against 22 GB/s for GMAC with AES-NI and
VPCLMULQDQ; at 1500-byte frames it cost 0.9 us per frame at each end.)

Liveness (since protocol 3): during a session each end sends a BEAT (an empty,
authenticated message) whenever it has sent nothing for
:data:`BEAT_INTERVAL_S`, and takes :data:`SILENCE_S` without any message as
the link, or the other host, gone.  TCP keepalive and ``TCP_USER_TIMEOUT``
say the same from the kernel's side: a partition that drops every packet
silently is seen within :data:`SILENCE_S` either way, not after the
kernel's default of some 15 minutes of retransmissions.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import socket
import ssl
import stat
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import NetpassError, UsageError

log = logging.getLogger(__name__)

PROTO = 5  # 4: the source's `prepare` (close the destination's hold before the park); 5: `settled`
HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, CONTROL, BATCH, BEAT = range(1, 9)
BEAT_INTERVAL_S = 1.0
SILENCE_S = 5.0
PREFIX = struct.Struct("!IB")
MAC_LEN = 16
MAX_MESSAGE = 32 << 20
# Until a peer has authenticated, a message is at most this big (a HELLO or
# an AUTH is under 200 bytes) and at most this much may wait unread: a peer
# without the token costs the agent a few KiB.
PREAUTH_MESSAGE = 1024
PREAUTH_QUEUE = 4096
HANDSHAKE_TIMEOUT = 10.0
MIN_TOKEN = 32
MIN_TOKEN_BITS = 128
SIOCOUTQNSD = 0x894B  # bytes in a TCP socket's queue not yet sent
# struct tcp_info's tcpi_busy_time and tcpi_rwnd_limited (microseconds the
# connection was busy sending, and of that, held back by the receiver's
# window), at this offset since Linux 4.10.
TCP_CHRONO = struct.Struct("=QQ")
TCP_CHRONO_AT = 168


class ChannelError(NetpassError):
    """The channel broke or carried something malformed."""


class AuthError(ChannelError):
    """The other end does not hold the same token."""

    exit_code = 3


class SilenceError(ChannelError):
    """Nothing came from the other end for SILENCE_S on a live channel."""


class RemoteError(ChannelError):
    """The other end reported an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def token_bits(token: bytes) -> float:
    """A rough upper bound on a token's entropy, in bits: the length of its
    shortest repeating unit times the Shannon entropy of that unit's byte
    frequencies.  A short, repeated or one-character pattern scores low;
    32 random bytes score 150 or more however they are written (raw, hex
    or base64)."""
    n = len(token)
    if not n:
        return 0.0
    period = next(p for p in range(1, n + 1) if token == (token[:p] * (n // p + 1))[:n])
    counts = Counter(token[:period])
    return period * -sum(c / period * math.log2(c / period) for c in counts.values())


def load_token(path: str | Path) -> bytes:
    """Read a token file; refuse a short or guessable token, warn about loose
    permissions."""
    p = Path(path)
    try:
        st = p.stat()
        token = p.read_bytes().strip()
    except OSError as exc:
        raise UsageError(f"cannot read token file {p}: {exc.strerror}") from exc
    make = "make one with: head -c 32 /dev/urandom | base64 > FILE"
    if len(token) < MIN_TOKEN:
        raise UsageError(f"the token in {p} is {len(token)} bytes; use at least {MIN_TOKEN} ({make})")
    if token_bits(token) < MIN_TOKEN_BITS:
        raise UsageError(f"the token in {p} looks guessable (about {token_bits(token):.0f} bits; "
                         f"{MIN_TOKEN_BITS} at least): {make}")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by others: chmod 600 it", p)
    return token


_NONCE = struct.Struct("!QBxxx")  # counter, type: 12 bytes


def _mac(aead: AESGCM, counter: int, mtype: int, payload: bytes | bytearray | memoryview) -> bytes:
    """GMAC of ``payload``: AES-GCM over no plaintext, the payload as associated data."""
    return aead.encrypt(_NONCE.pack(counter, mtype), b"", payload)


def _derive(token: bytes, label: bytes, nc: bytes, ns: bytes) -> bytes:
    return hmac.new(token, label + nc + ns, hashlib.sha256).digest()


class _Closed(Exception):
    """The connection ended (``cause`` is the OS error, if any)."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(str(cause) if cause else "closed")
        self.cause = cause


class _Oversized(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class Wire(asyncio.BufferedProtocol):
    """The channel's receiving end: the kernel writes each message straight
    into its own buffer (``recv_into``), no stream buffer in between.

    asyncio's StreamReader copies every byte into its buffer, again out of
    it, and moves the rest down: measured on a 768 KiB message stream, 2.4
    to 3.6 us of CPU per 1500-byte frame, against 0.23 us this way.  A
    message is ``length u32 | type u8 | rest``; the length is checked
    before its buffer is allocated.
    """

    HIGH = 16 << 20  # bytes of unread messages before reading pauses
    LOW = 4 << 20

    def __init__(self, on_connect: Callable[[Wire, _Writer], None] | None = None,
                 max_message: int = MAX_MESSAGE, high: int = HIGH) -> None:
        self.max_message, self.high = max_message, high
        self.transport: asyncio.BaseTransport | None = None
        self._head = bytearray(PREFIX.size)
        self._body: bytearray | None = None
        self._target = memoryview(self._head)
        self._pos = 0
        self._mtype = 0
        self._queue: deque[tuple[int, bytearray]] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_rx_t = time.monotonic()  # when bytes last came in
        self._on_connect = on_connect

    # -- asyncio callbacks --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self._on_connect is not None:
            self._on_connect(self, _Writer(transport, self))  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._target[self._pos:]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx_t = time.monotonic()
        self._pos += nbytes
        if self._pos < len(self._target):
            return
        if self._body is None:
            size, self._mtype = PREFIX.unpack(self._head)
            if not 1 <= size <= self.max_message:
                self._fail(_Oversized(size))
                assert self.transport is not None
                self.transport.close()
                return
            self._body = bytearray(size - 1)
            self._target, self._pos = memoryview(self._body), 0
            if size > 1:
                return
        self._queue.append((self._mtype, self._body))
        self._queued += len(self._body)
        self._body = None
        self._target, self._pos = memoryview(self._head), 0
        self._wake()
        if self._queued > self.high and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(_Closed(exc))
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    # -- for the channel ----------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def trust(self) -> None:
        """The peer authenticated: full-size messages from now on."""
        self.max_message, self.high = MAX_MESSAGE, self.HIGH
        if self._reading_paused and self._error is None:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def ready(self) -> bool:
        """Whether a whole message is waiting (``read`` then returns at once)."""
        return bool(self._queue)

    async def read(self) -> tuple[int, bytearray]:
        """The next whole message: its type and the rest (payload and MAC)."""
        while not self._queue:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        mtype, body = self._queue.popleft()
        self._queued -= len(body)
        if self._reading_paused and self._queued < min(self.LOW, self.high // 2) and self._error is None:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return mtype, body

    async def drain(self) -> None:
        if self._error is not None and isinstance(self._error, _Closed):
            raise ConnectionResetError("connection lost")
        if self._writing_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut


class _Writer:
    """The sending end: the transport, with drain() and wait_closed()."""

    def __init__(self, transport: asyncio.WriteTransport, wire: Wire) -> None:
        self.transport = transport
        self._wire = wire

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def writelines(self, parts: list[bytes | bytearray]) -> None:
        self.transport.writelines(parts)

    async def drain(self) -> None:
        await self._wire.drain()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._wire._closed)


def keepalive(sock: Any) -> None:
    """Kernel-side liveness on a TCP socket: keepalive probes after 2 s
    idle, every second, 3 of them; and unacknowledged data for SILENCE_S
    ends the connection (``TCP_USER_TIMEOUT``)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(SILENCE_S * 1000))


async def serve(handler: Callable[[Wire, _Writer], Coroutine[Any, Any, None]], host: str, port: int,
                ssl_ctx: ssl.SSLContext | None = None) -> asyncio.Server:
    """Listen; run ``handler(reader, writer)`` for each connection."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def connected(wire: Wire, writer: _Writer) -> None:
        keepalive(writer.get_extra_info("socket"))
        task = loop.create_task(handler(wire, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await loop.create_server(lambda: Wire(connected, PREAUTH_MESSAGE, PREAUTH_QUEUE), host, port,
                                    ssl=ssl_ctx)


@dataclass
class Channel:
    reader: Wire
    writer: _Writer
    send_key: AESGCM | None = None
    recv_key: AESGCM | None = None
    sent: int = 0
    received: int = 0
    bytes_out: int = 0
    peer: str = "?"
    # The compression policy's measurements (see should_compress).
    link_rate: float | None = None  # bytes/s the link drained while busy
    peer_limited: float | None = None  # share of that busy time the receiver's window held us back
    zstd_rate: float = 400e6  # bytes/s zstd compresses here (a prior, then measured)
    zstd_ratio: float = 1.7
    _busy_since: tuple[float, int, tuple[int, int] | None] | None = None
    last_sent: float = 0.0  # monotonic time of the last message sent
    beats_received: int = 0
    _beats: asyncio.Task[None] | None = None

    def start_beats(self) -> None:
        """From now on: a BEAT whenever nothing else went out for a while,
        and silence of :data:`SILENCE_S` from the other end is an error."""
        if self._beats is None:
            self._beats = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            wait = self.last_sent + BEAT_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                await self.send(BEAT, b"")
            except ChannelError:
                return  # the receiving side says why

    @property
    def live(self) -> bool:
        return self._beats is not None

    async def send(self, mtype: int, payload: bytes | bytearray) -> None:
        mac = b""
        if self.send_key is not None:
            mac = _mac(self.send_key, self.sent, mtype, payload)
            self.sent += 1
        size = 1 + len(payload) + len(mac)
        if size > MAX_MESSAGE:
            raise ChannelError(f"message of {size} bytes exceeds {MAX_MESSAGE}")
        parts = [PREFIX.pack(size, mtype), payload, mac]
        self._write(parts, PREFIX.size + len(payload) + len(mac))
        self.bytes_out += PREFIX.size + len(payload) + len(mac)
        self.last_sent = time.monotonic()
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelError(f"connection to {self.peer} lost: {exc}") from exc

    def _write(self, parts: list[bytes | bytearray], total: int) -> None:
        """One vectored write (writev) of prefix, payload and MAC, without
        joining them, when nothing is queued ahead; what the socket does not
        take goes to the transport, which keeps the order.  (asyncio 3.11's
        writelines joins, and its buffer copies what a partial send left.)
        TLS goes through the transport."""
        transport = self.writer.transport
        fd = self._fd
        if (fd is None or transport.get_write_buffer_size()
                or transport.get_extra_info("sslcontext") is not None or transport.is_closing()):
            self.writer.writelines(parts)
            return
        try:
            sent = os.writev(fd, parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ChannelError(f"connection to {self.peer} lost: {exc}") from exc
        if sent < total:
            rest = memoryview(b"".join(parts))[sent:]
            self.writer.write(rest)

    def backlog(self) -> int:
        """Bytes written but not yet sent: asyncio's buffer plus the socket's
        unsent queue (SIOCOUTQNSD).  It grows when the link, or the other end,
        is slower than we produce."""
        queued = self.writer.transport.get_write_buffer_size()
        fd = self._fd
        if fd is not None:
            try:
                buf = fcntl.ioctl(fd, SIOCOUTQNSD, b"\0\0\0\0")
                queued += struct.unpack("i", buf)[0]
            except OSError:
                pass
        return queued

    def should_compress(self, mode: str, raw_bytes: int) -> bool:
        """The compression policy: ``zstd`` always, ``none`` never, ``auto``
        when it gains time.

        zstd buys link time with CPU time.  Compressing B bytes costs
        B / zstd_rate seconds and saves B (1 - 1/ratio) / link_rate seconds
        on the link, so it pays when link_rate < zstd_rate (1 - 1/ratio):
        with zstd -1 here (~420 MB/s, ratio ~1.8 on mixed traffic) below
        about 1.5 Gbit/s.  ``auto`` compresses a batch when the link is
        behind (at least the batch's size is unsent) and the rate at which
        it drains, measured while it was busy, is below that break-even.
        A link that keeps up gets the batches as they are.  So does one
        whose far end is the bottleneck: TCP says so (the share of the busy
        time its receive window held us back, ``tcp_info``); compressing
        for it would only give the slow end decompression to do.  At 64-byte
        frames the agent is such an end: its per-frame work, not the bytes,
        sets the pace, and the drain looked like a link of ~90 Mbit/s.
        """
        if mode == "zstd":
            return True
        if mode == "none":
            return False
        now = time.monotonic()
        backlog = self.backlog()
        done = self.bytes_out - backlog  # bytes the kernel has sent so far
        chrono = self._tcp_chrono()
        if self._busy_since is not None and now > self._busy_since[0]:
            t0, done0, chrono0 = self._busy_since
            sample = (done - done0) / (now - t0)
            self.link_rate = sample if self.link_rate is None else 0.7 * self.link_rate + 0.3 * sample
            if chrono is not None and chrono0 is not None and chrono[0] > chrono0[0]:
                share = min(1.0, (chrono[1] - chrono0[1]) / (chrono[0] - chrono0[0]))
                self.peer_limited = (share if self.peer_limited is None
                                     else 0.7 * self.peer_limited + 0.3 * share)
        self._busy_since = (now, done, chrono) if backlog > 0 else None
        if backlog < raw_bytes or self.link_rate is None:
            return False
        if chrono is not None and (self.peer_limited is None or self.peer_limited > 0.5):
            return False  # the far end is the slow one, or TCP has not said yet which
        return self.link_rate < self.zstd_rate * (1 - 1 / max(self.zstd_ratio, 1.0))

    def _tcp_chrono(self) -> tuple[int, int] | None:
        """(busy, receive-window-limited) microseconds of the TCP connection."""
        sock = self.writer.transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_CHRONO_AT + TCP_CHRONO.size)
        except OSError:
            return None
        if len(info) < TCP_CHRONO_AT + TCP_CHRONO.size:
            return None  # a kernel older than 4.10
        busy, rwnd = TCP_CHRONO.unpack_from(info, TCP_CHRONO_AT)
        return busy, rwnd

    def compressed(self, raw_bytes: int, packed_bytes: int, seconds: float) -> None:
        """Learn zstd's speed and ratio on this traffic from a batch it compressed."""
        if raw_bytes and packed_bytes and seconds > 0:
            self.zstd_rate = 0.7 * self.zstd_rate + 0.3 * raw_bytes / seconds
            self.zstd_ratio = 0.7 * self.zstd_ratio + 0.3 * raw_bytes / packed_bytes

    @property
    def _fd(self) -> int | None:
        sock = self.writer.transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        return fd if fd >= 0 else None  # -1 once the connection is closed

    async def send_json(self, mtype: int, obj: dict[str, Any]) -> None:
        await self.send(mtype, json.dumps(obj).encode())

    async def recv(self, timeout: float | None = None) -> tuple[int, bytes | memoryview]:
        """The next message other than a BEAT, within ``timeout`` seconds;
        on a live channel, also within :data:`SILENCE_S` of the last message
        of any kind."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            mtype, payload = await self._recv_one(deadline)
            if mtype != BEAT:
                return mtype, payload
            self.beats_received += 1

    async def _recv_one(self, deadline: float | None) -> tuple[int, bytes | memoryview]:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            silent = self.live and (wait is None or wait > SILENCE_S)
            if silent:
                wait = SILENCE_S
            started = time.monotonic()
            try:
                if self.reader.ready():  # no timer and no task for a message already here
                    mtype, body = await self.reader.read()
                else:
                    async with asyncio.timeout(wait):
                        mtype, body = await self.reader.read()
                break
            except _Oversized as exc:
                raise ChannelError(f"{self.peer} sent a message of {exc.size} bytes: refused") from exc
            except _Closed as exc:
                if exc.cause is not None:
                    raise ChannelError(f"connection to {self.peer} lost: {exc.cause}") from exc
                raise ChannelError(f"{self.peer} closed the connection") from exc
            except TimeoutError as exc:
                if not silent:
                    raise ChannelError(f"{self.peer} sent nothing for {wait:.0f} s") from exc
                # Silence is judged by when bytes came, not by the timer
                # alone: with this process's event loop held up, the timer
                # and bytes that came meanwhile are due in the same turn,
                # and the timer runs first (seen: an agent on a loaded host
                # took a live source for a silent one, and the session's
                # frames were lost with it).
                if self.reader.ready() or self.reader.last_rx_t > started:
                    continue
                late = time.monotonic() - started - SILENCE_S
                held = f" (this process itself ran {late:.1f} s late)" if late > 0.5 else ""
                raise SilenceError(f"{self.peer} has been silent for {SILENCE_S:.0f} s: the link or "
                                   f"that host is down{held}") from exc
            except (ConnectionError, OSError) as exc:
                raise ChannelError(f"connection to {self.peer} lost: {exc}") from exc
        if self.recv_key is not None:
            if len(body) < MAC_LEN:
                raise ChannelError(f"{self.peer} sent a message without its MAC")
            # A batch is handed on as a read-only view (no copy of up to 16
            # MiB); the rest as bytes.
            payload = (memoryview(body).toreadonly()[:-MAC_LEN] if mtype == BATCH
                       else bytes(body[:-MAC_LEN]))
            mac = bytes(body[-MAC_LEN:])
            if not hmac.compare_digest(mac, _mac(self.recv_key, self.received, mtype, payload)):
                raise ChannelError(f"message {self.received} from {self.peer} failed "
                                   "authentication (altered, replayed or injected)")
            self.received += 1
        else:
            payload = memoryview(body).toreadonly() if mtype == BATCH else bytes(body)
        if mtype == ERROR:
            err = _json(bytes(payload))
            code = str(err.get("code", "error"))
            if code == "auth":
                raise AuthError(str(err.get("message", "authentication failed")))
            raise RemoteError(code, str(err.get("message", "remote error")))
        return mtype, payload

    async def recv_json(self, expect: int, timeout: float | None = None) -> dict[str, Any]:
        mtype, payload = await self.recv(timeout)
        if mtype != expect:
            raise ChannelError(f"{self.peer} sent message type {mtype}, expected {expect}")
        return _json(bytes(payload))

    async def close(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            try:
                await self._beats
            except asyncio.CancelledError:
                pass
        try:
            self.writer.close()
            async with asyncio.timeout(2):
                await self.writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError):
            pass


def _json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ChannelError("malformed control message") from exc
    if not isinstance(obj, dict):
        raise ChannelError("control message is not an object")
    return obj


def _hexfield(obj: dict[str, Any], key: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(str(obj[key]))
    except (KeyError, ValueError) as exc:
        raise ChannelError(f"handshake field {key} missing or malformed") from exc
    if len(raw) != size:
        raise ChannelError(f"handshake field {key} has the wrong size")
    return raw


async def client_handshake(ch: Channel, token: bytes) -> None:
    nc = os.urandom(32)
    await ch.send_json(HELLO, {"proto": PROTO, "nonce": nc.hex()})
    msg = await ch.recv_json(CHALLENGE, HANDSHAKE_TIMEOUT)
    ns = _hexfield(msg, "nonce", 32)
    proof_s = _hexfield(msg, "proof", 32)
    if not hmac.compare_digest(proof_s, _derive(token, b"server", nc, ns)):
        try:  # tell the agent why, so its log says it too
            await ch.send_json(ERROR, {"code": "auth", "message": "the agent's proof does not match "
                                       "the client's token"})
        except ChannelError:
            pass
        await ch.close()
        raise AuthError(f"authentication failed: the agent at {ch.peer} does not hold the same "
                        "token (check --token-file on both hosts)")
    await ch.send_json(AUTH, {"proof": _derive(token, b"client", nc, ns).hex()})
    try:
        await ch.recv_json(AUTH_OK, HANDSHAKE_TIMEOUT)
    except AuthError as exc:
        raise AuthError(f"authentication failed: the agent at {ch.peer} refused our token "
                        f"({exc}); check --token-file on both hosts") from exc
    ch.send_key = AESGCM(_derive(token, b"c2s", nc, ns))
    ch.recv_key = AESGCM(_derive(token, b"s2c", nc, ns))


async def server_handshake(ch: Channel, token: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """The agent's side; one deadline covers all of it."""
    try:
        async with asyncio.timeout(timeout):
            await _server_handshake(ch, token)
    except TimeoutError as exc:
        raise ChannelError(f"{ch.peer} did not complete the handshake within {timeout:.0f} s") from exc


async def _server_handshake(ch: Channel, token: bytes) -> None:
    hello = await ch.recv_json(HELLO, HANDSHAKE_TIMEOUT)
    if hello.get("proto") != PROTO:
        await ch.send_json(ERROR, {"code": "proto", "message": f"protocol {hello.get('proto')} "
                                   f"is not supported; this agent speaks {PROTO}"})
        raise ChannelError(f"{ch.peer} speaks protocol {hello.get('proto')}")
    nc = _hexfield(hello, "nonce", 32)
    ns = os.urandom(32)
    await ch.send_json(CHALLENGE, {"nonce": ns.hex(), "proof": _derive(token, b"server", nc, ns).hex()})
    try:
        auth = await ch.recv_json(AUTH, HANDSHAKE_TIMEOUT)
    except AuthError as exc:
        raise AuthError(f"client {ch.peer} failed authentication: {exc}") from exc
    proof_c = _hexfield(auth, "proof", 32)
    if not hmac.compare_digest(proof_c, _derive(token, b"client", nc, ns)):
        await ch.send_json(ERROR, {"code": "auth", "message": "wrong token"})
        raise AuthError(f"client {ch.peer} failed authentication (wrong token)")
    ch.reader.trust()  # before AUTH_OK: the client's first batch may follow it at once
    await ch.send_json(AUTH_OK, {})
    ch.send_key = AESGCM(_derive(token, b"s2c", nc, ns))
    ch.recv_key = AESGCM(_derive(token, b"c2s", nc, ns))


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def connect(hostport: str, token: bytes, tls_ca: str | None = None,
                  timeout: float = 10.0) -> Channel:
    host, port = parse_hostport(hostport)
    ctx = None
    if tls_ca:
        ctx = ssl.create_default_context(cafile=tls_ca)
        ctx.check_hostname = False  # the token authenticates the agent; TLS adds secrecy
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, wire = await loop.create_connection(Wire, host, port, ssl=ctx)
        reader, writer = wire, _Writer(transport, wire)
    except (TimeoutError, OSError, ssl.SSLError) as exc:
        raise ChannelError(f"cannot reach the agent at {hostport}: {exc or 'timed out'}; "
                           "is 'netpass agent' running there?") from exc
    keepalive(writer.get_extra_info("socket"))
    ch = Channel(reader, writer, peer=hostport)
    try:
        await client_handshake(ch, token)
    except BaseException:
        await ch.close()
        raise
    return ch
