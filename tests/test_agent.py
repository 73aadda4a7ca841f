"""The agent and the channel under bad input: wrong tokens, garbage, replays,
paths outside --qmp-root, malformed batches.  The agent must refuse each with a
clear error and keep serving."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from netpass import channel, wire
from netpass.agent import Agent, DestSession, SessionError
from netpass.channel import CONTROL, AuthError, ChannelError, RemoteError
from netpass.deststate import AgentConfig, DestNic
from netpass.errors import UsageError
from netpass.nics import Nic
from netpass.pending import retained

TOKEN = b"9f1c3e7a52d04b8e6a1f0c2d7b94e3a5c8d16f2e0b7a4c9d3e58f1a06b2c7d4e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def with_agent(tmp_path: Path, body: Any) -> None:
    port = free_port()
    agent = Agent(AgentConfig(listen=f"127.0.0.1:{port}", token=TOKEN, qmp_root=tmp_path))
    await agent.start()
    try:
        await body(f"127.0.0.1:{port}")
    finally:
        assert agent.server is not None
        agent.server.close()
        await agent.server.wait_closed()


async def ping(addr: str) -> dict[str, Any]:
    ch = await channel.connect(addr, TOKEN)
    try:
        await ch.send_json(CONTROL, {"op": "ping"})
        return await ch.recv_json(CONTROL, timeout=5)
    finally:
        await ch.close()


def test_wrong_token_then_agent_still_serves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(addr: str) -> None:
        with pytest.raises(AuthError, match="authentication failed"):
            await channel.connect(addr, b"another-token-of-enough-length-99")
        assert (await ping(addr))["op"] == "pong"

    with caplog.at_level(logging.ERROR):
        asyncio.run(with_agent(tmp_path, body))
    assert "failed authentication" in caplog.text


def test_garbage_and_oversized_input(tmp_path: Path) -> None:
    async def body(addr: str) -> None:
        host, port = channel.parse_hostport(addr)
        for junk in (os.urandom(300), struct.pack("!IB", 1 << 30, 1) + b"x" * 10, b"\0" * 5):
            r, w = await asyncio.open_connection(host, port)
            w.write(junk)
            await w.drain()
            try:
                got = await asyncio.wait_for(r.read(), 15)
            except ConnectionResetError:
                got = b""  # it stopped reading at the bad length: the rest unread, a reset
            assert got == b""  # the agent hangs up
            w.close()
        assert (await ping(addr))["op"] == "pong"

    asyncio.run(with_agent(tmp_path, body))


def test_replayed_message_is_refused(tmp_path: Path) -> None:
    async def body(addr: str) -> None:
        ch = await channel.connect(addr, TOKEN)
        sent: list[bytes] = []
        orig = ch._write

        def spy(parts: list[bytes], total: int) -> None:
            sent.append(b"".join(parts))
            orig(parts, total)

        ch._write = spy  # type: ignore[method-assign]
        await ch.send_json(CONTROL, {"op": "nonsense"})
        reply_type, payload = 0, b""
        with pytest.raises((RemoteError, ChannelError)):
            reply_type, payload = await ch.recv(timeout=5)
        await ch.close()
        # The same bytes on a new connection: without the handshake's keys
        # they are not even a valid hello.
        host, port = channel.parse_hostport(addr)
        r, w = await asyncio.open_connection(host, port)
        w.write(sent[0])
        await w.drain()
        assert await asyncio.wait_for(r.read(), 15) == b""
        w.close()
        assert (await ping(addr))["op"] == "pong"

    asyncio.run(with_agent(tmp_path, body))


def test_qmp_path_outside_root_and_missing_socket(tmp_path: Path) -> None:
    async def body(addr: str) -> None:
        for path, code in (("/etc/passwd", "qmp_root"), (str(tmp_path / "../escape.qmp"), "qmp_root"),
                           (str(tmp_path / "absent.qmp"), "qmp")):
            ch = await channel.connect(addr, TOKEN)
            await ch.send_json(CONTROL, {"op": "open", "dest_qmp": path, "macs": ["52:54:00:00:00:01"]})
            with pytest.raises(RemoteError) as info:
                await ch.recv(timeout=10)
            assert info.value.code == code, info.value
            await ch.close()
        assert (await ping(addr))["op"] == "pong"

    asyncio.run(with_agent(tmp_path, body))


VM = bytes.fromhex("525400000001")
PEER = bytes.fromhex("0200000000aa")


class FakeRing:
    """Stands in for the TX ring: records what the agent queued, in order."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_span(self, body: memoryview, offsets: Any, start: int, end: int) -> int:
        ends = [int(x) for x in offsets[start:end + 1]]
        # the ring takes a virtio-net header with each record
        self.sent += [bytes(body[a + 10:b]) for a, b in itertools.pairwise(ends)]
        return end - start

    def close(self) -> None:
        pass


class Gauge:
    """The tap ring's level, as the test sets it (the kernel's in the agent)."""

    def __init__(self) -> None:
        self.level = 0

    def __call__(self, dn: DestNic) -> int:
        return self.level


RING = 1000
FULL = RING  # a level at which the replay has no room (the VM paused, its ring full)


def _session(tmp_path: Path) -> tuple[DestSession, FakeRing]:
    sess = DestSession(AgentConfig(listen="127.0.0.1:1", token=TOKEN, qmp_root=tmp_path), None, "t",  # type: ignore[arg-type]
                       gauge=Gauge())
    inj = FakeRing()
    nic = Nic(mac="52:54:00:00:00:01", tap="nonexistent0")
    dn = DestNic(nic=nic, ring=inj, fds=[], orig_qlen=RING, mac_bytes=VM)  # type: ignore[arg-type]
    sess.nics.append(dn)
    sess.running = True
    return sess, inj


def level(sess: DestSession, frames: int) -> None:
    """The destination tap's ring holds ``frames`` from now on."""
    gauge = sess.replay.gauge
    assert isinstance(gauge, Gauge)
    gauge.level = frames


def feed_all(sess: DestSession) -> None:
    """The VM reads as fast as the agent feeds: feed until nothing is pending."""
    level(sess, 0)
    for _ in range(10_000):
        if not any(dn.pending for dn in sess.nics):
            return
        sess.replay.feed()
    raise AssertionError("the feed never emptied")




def frame(dst: bytes, src: bytes = PEER, n: int = 0) -> bytes:
    return dst + src + b"\x08\x00" + n.to_bytes(4, "big") + bytes(42)


def test_batches_checked_before_anything_is_replayed(tmp_path: Path) -> None:
    sess, inj = _session(tmp_path)
    good = wire.encode(0, [wire.Frame(0, b"", frame(VM, n=1)), wire.Frame(0, b"", frame(b"\xff" * 6, n=2))])
    assert sess.replay.accept(good) == {"seq": 0, "accepted": 2, "dropped": 0, "skipped": []}
    assert len(inj.sent) == 2
    # Out of sequence (a replayed batch): refused whole.
    with pytest.raises(SessionError, match="out of sequence"):
        sess.replay.accept(good)
    # Corrupt: refused whole, nothing replayed.
    bad = bytearray(wire.encode(1, [wire.Frame(0, b"", frame(VM, n=3))]))
    bad[-1] ^= 0xFF
    with pytest.raises(wire.WireError):
        sess.replay.accept(bytes(bad))
    # A NIC index the session does not have.
    with pytest.raises(wire.WireError, match="NIC index"):
        sess.replay.accept(wire.encode(1, [wire.Frame(3, b"", frame(VM))]))
    assert len(inj.sent) == 2


@pytest.mark.parametrize("vnet", [b"", bytes(10)])
def test_only_frames_for_the_vm_are_replayed(tmp_path: Path, vnet: bytes) -> None:
    sess, inj = _session(tmp_path)
    frames = [wire.Frame(0, vnet, frame(VM, n=1)),                       # to the VM
              wire.Frame(0, vnet, frame(bytes.fromhex("525400000099"))),   # someone else
              wire.Frame(0, vnet, frame(b"\x01\x00\x5e\x00\x00\x01")),     # multicast
              wire.Frame(0, vnet, frame(b"\xff" * 6, src=VM))]             # the VM's own
    ack = sess.replay.accept(wire.encode(0, frames))
    assert ack == {"seq": 0, "accepted": 2, "dropped": 2, "skipped": [1, 3]}
    assert inj.sent == [frames[0].data, frames[2].data]
    assert sess.nics[0].dropped == {"foreign_mac": 1, "own_frame": 1}


class Told:
    """Stands in for the channel to the source: records the "fed" reports."""

    def __init__(self) -> None:
        self.fed: list[int] = []

    async def send_json(self, stream: int, msg: dict[str, Any]) -> None:
        assert stream == CONTROL and msg["op"] == "fed"
        self.fed.append(msg["fed"])


def test_a_backlog_fed_fast_is_reported_at_once(tmp_path: Path) -> None:
    """What the agent fed and did not report is counted lost should it
    vanish: a burst is reported as soon as it is in, a trickle within 20 ms."""
    sess, inj = _session(tmp_path)
    told = Told()
    sess.replay.ch = told  # type: ignore[assignment]
    level(sess, FULL)
    sess.replay.accept(wire.encode(0, [wire.Frame(0, b"", frame(VM, n=i)) for i in range(200)]))
    feed_all(sess)

    async def body() -> None:
        await sess.replay.tell_fed()
        assert told.fed == [200]
        level(sess, FULL)
        sess.replay.accept(wire.encode(1, [wire.Frame(0, b"", frame(VM, n=i)) for i in range(5)]))
        feed_all(sess)
        await sess.replay.tell_fed()
        assert told.fed == [200]  # five frames wait for the timer
        await asyncio.sleep(0.025)
        await sess.replay.tell_fed()
        assert told.fed == [200, 205]

    asyncio.run(body())
    assert len(inj.sent) == 205


def test_agent_cache_is_bounded(tmp_path: Path) -> None:
    sess, inj = _session(tmp_path)
    sess.cfg.max_cache_bytes = 100
    level(sess, FULL)  # everything is held
    ack = sess.replay.accept(wire.encode(0, [wire.Frame(0, b"", frame(VM, n=i)) for i in range(5)]))
    assert ack["accepted"] == 1 and ack["dropped"] == 4
    assert sess.nics[0].dropped == {"agent_cache_full": 4}
    assert sess.cache_bytes <= 100


def test_cache_cap_counts_what_the_fast_path_keeps(tmp_path: Path) -> None:
    """64-byte frames, whole batches kept as received: the memory kept alive
    (message buffers and offsets) stays within the cap; before, only the
    records were counted and the cache went some 13% over."""
    sess, inj = _session(tmp_path)
    cap = 200_000
    sess.cfg.max_cache_bytes = cap
    level(sess, FULL)
    dropped = 0
    for seq in range(60):
        frames = [wire.Frame(0, bytes(10), frame(VM, n=seq * 256 + i)[:54]) for i in range(256)]
        blob = bytearray(wire.encode(seq, frames, compress=False))
        ack = sess.replay.accept(memoryview(blob).toreadonly())
        dropped += ack["dropped"]
    assert dropped, "the cap was never reached: the test proves nothing"
    kept = sum(retained(c[0]) + c[1].nbytes for c in sess.nics[0].pending.chunks)
    assert kept <= cap and sess.cache_bytes == kept
    feed_all(sess)
    assert sess.cache_bytes == 0


def test_token_file_checks(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(UsageError, match="at least"):
        channel.load_token(short)
    guessable = tmp_path / "guessable"
    guessable.write_text("password" * 5)
    with pytest.raises(UsageError, match="guessable"):
        channel.load_token(guessable)
    with pytest.raises(UsageError, match="cannot read"):
        channel.load_token(tmp_path / "missing")
    good = tmp_path / "good"
    good.write_bytes(TOKEN + b"\n")
    good.chmod(0o600)
    assert channel.load_token(good) == TOKEN
    for bad in ("nohost", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(UsageError):
            channel.parse_hostport(bad)


def test_tls_channel(tmp_path: Path) -> None:
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=netpass-test"],
                   check=True, capture_output=True)

    async def main() -> None:
        port = free_port()
        agent = Agent(AgentConfig(listen=f"127.0.0.1:{port}", token=TOKEN, qmp_root=tmp_path,
                                  tls_cert=str(cert), tls_key=str(key)))
        await agent.start()
        try:
            ch = await channel.connect(f"127.0.0.1:{port}", TOKEN, tls_ca=str(cert))
            await ch.send_json(CONTROL, {"op": "ping"})
            assert (await ch.recv_json(CONTROL, timeout=5))["op"] == "pong"
            await ch.close()
            with pytest.raises(ChannelError):  # plain TCP to a TLS agent
                await channel.connect(f"127.0.0.1:{port}", TOKEN, timeout=5)
        finally:
            assert agent.server is not None
            agent.server.close()
            await agent.server.wait_closed()
        # A key that is not the certificate's: a clear error, not a traceback.
        other = tmp_path / "other.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
        wrong = Agent(AgentConfig(listen=f"127.0.0.1:{free_port()}", token=TOKEN, qmp_root=tmp_path,
                                  tls_cert=str(cert), tls_key=str(other)))
        with pytest.raises(UsageError, match="does not belong to the certificate"):
            await wrong.start()
        missing = Agent(AgentConfig(listen=f"127.0.0.1:{free_port()}", token=TOKEN, qmp_root=tmp_path,
                                    tls_cert=str(tmp_path / "nope.pem"), tls_key=str(other)))
        with pytest.raises(UsageError, match="cannot read"):
            await missing.start()

    asyncio.run(main())


def test_compression_policy(tmp_path: Path) -> None:
    async def body(addr: str) -> None:
        ch = await channel.connect(addr, TOKEN)
        try:
            assert ch.should_compress("zstd", 10**6) and not ch.should_compress("none", 10**6)
            assert ch.backlog() == 0  # an idle link: auto does not spend CPU on zstd
            assert not ch.should_compress("auto", 1)
            ch.backlog = lambda: 10**6  # type: ignore[method-assign]  # a link that fell behind ...
            ch.link_rate = 50e6  # ... and drains at 400 Mbit/s: zstd (~400 MB/s) gains time ...
            assert not ch.should_compress("auto", 512 * 64)  # ... once TCP says the link is the slow end
            ch.link_rate, ch.peer_limited = 50e6, 0.0
            assert ch.should_compress("auto", 512 * 64)
            ch.link_rate = 1e9  # 8 Gbit/s, behind only because the far end is slow: it would not
            ch._busy_since = None
            assert not ch.should_compress("auto", 512 * 64)
            ch.compressed(10**6, 5 * 10**5, 0.001)  # zstd measured at 1 GB/s, ratio 2 here
            assert ch.zstd_rate > 400e6 and ch.zstd_ratio > 1.7
        finally:
            await ch.close()

    asyncio.run(with_agent(tmp_path, body))


def test_compression_policy_leaves_a_slow_receiver_alone(tmp_path: Path) -> None:
    """Behind because the far end reads slowly (TCP's receive window held
    the sender back): compressing would only give that end more work."""
    async def body(addr: str) -> None:
        ch = await channel.connect(addr, TOKEN)
        try:
            busy, rwnd = ch._tcp_chrono() or (None, None)
            assert busy is not None and rwnd is not None and 0 <= rwnd <= busy  # a live tcp_info
            ch.backlog = lambda: 10**6  # type: ignore[method-assign]
            clock = [busy, rwnd]
            ch._tcp_chrono = lambda: (clock[0], clock[1])  # type: ignore[method-assign]
            assert not ch.should_compress("auto", 512 * 64)  # the first look only starts a measure
            for _ in range(5):  # busy sending, never held back by the window: the link is slow
                clock[0] += 10_000
                ch.link_rate = 50e6  # (nothing drained meanwhile: the samples keep it slow)
                assert ch.should_compress("auto", 512 * 64)
            for _ in range(5):  # 90% of the busy time held back by the receiver's window
                clock[0] += 10_000
                clock[1] += 9_000
                ch.link_rate = 50e6  # (nothing drained meanwhile: the samples keep it slow)
                decision = ch.should_compress("auto", 512 * 64)
            assert ch.peer_limited is not None and ch.peer_limited > 0.5 and not decision
        finally:
            await ch.close()

    asyncio.run(with_agent(tmp_path, body))


def test_compression_policy_on_a_closed_channel(tmp_path: Path) -> None:
    async def body(addr: str) -> None:
        ch = await channel.connect(addr, TOKEN)
        await ch.close()
        assert ch.backlog() >= 0 and not ch.should_compress("auto", 1)  # no crash on a dead socket

    asyncio.run(with_agent(tmp_path, body))


def test_flooded_copy_suppressed_from_a_received_view(tmp_path: Path) -> None:
    """Batches arrive as views of the message buffer: duplicate suppression
    must still find the frame the network delivered directly."""
    sess, inj = _session(tmp_path)
    f = frame(VM, n=7)
    sess.replay.count_direct(sess.nics[0], f)
    for seq, vnet in enumerate([b"", bytes(10)]):
        if seq:
            sess.replay.count_direct(sess.nics[0], f)
        blob = bytearray(wire.encode(seq, [wire.Frame(0, vnet, f), wire.Frame(0, vnet, frame(VM, n=8))],
                                     compress=False))
        ack = sess.replay.accept(memoryview(blob).toreadonly())
        assert ack["skipped"] == [0] and sess.nics[0].duplicates == seq + 1 and len(inj.sent) == seq + 1


@pytest.mark.parametrize("compress", [False, True])
def test_usual_batch_is_cached_without_a_copy(tmp_path: Path, compress: bool) -> None:
    """Every frame to the VM, with its virtio-net header: the cache keeps the
    received body itself, and replays exactly those frames, in order."""
    sess, inj = _session(tmp_path)
    level(sess, FULL)  # the VM is paused
    frames = [wire.Frame(0, bytes([i % 256]) * 10, frame(VM, n=i)) for i in range(300)]
    sess.replay.count_direct(sess.nics[0], frame(b"\xff" * 6, n=1))  # a broadcast seen here cannot match
    blob = bytearray(wire.encode(0, frames, compress=compress))
    ack = sess.replay.accept(memoryview(blob).toreadonly())
    assert ack == {"seq": 0, "accepted": 300, "dropped": 0, "skipped": []}
    chunk = sess.nics[0].pending.chunks[0]
    if not compress:
        assert chunk[0].obj is blob  # the message, not a copy
    # What the cache counts is what it keeps alive: the whole message, not only the records.
    assert sess.cache_bytes == retained(chunk[0]) + chunk[1].nbytes
    assert sess.cache_bytes > sum(len(f.vnet_hdr) + len(f.data) for f in frames)
    feed_all(sess)
    assert inj.sent == [f.data for f in frames] and sess.cache_bytes == 0


def test_source_mac_split_across_two_records_is_still_replayed(tmp_path: Path) -> None:
    """The quick check joins the source MACs: the VM's MAC can appear across
    two of them.  That only sends the batch through the per-frame path."""
    sess, inj = _session(tmp_path)
    frames = [wire.Frame(0, bytes(10), frame(VM, src=b"\x02\x00\x00" + VM[:3], n=1)),
              wire.Frame(0, bytes(10), frame(VM, src=VM[3:] + b"\x00\x00\x02", n=2))]
    ack = sess.replay.accept(wire.encode(0, frames))
    assert ack == {"seq": 0, "accepted": 2, "dropped": 0, "skipped": []}
    assert inj.sent == [f.data for f in frames]


def test_a_release_window_tops_the_ring_up_and_no_further() -> None:
    from netpass.pacing import grant_needed, release_window, window_top

    assert window_top(1000) == 625
    assert release_window(0, 1000) == 625
    assert release_window(600, 1000) == 25
    assert release_window(900, 1000) == 0  # a full ring: nothing
    # Not worth a tc change: less than a 32nd of the ring.
    assert not grant_needed(25, 1000, passed=625, granted=625)
    # A new window once half the last one passed.
    assert not grant_needed(600, 1000, passed=312, granted=625)
    assert grant_needed(600, 1000, passed=313, granted=625)


def test_a_straggler_replay_leaves_room_for_the_open_window() -> None:
    """A replay while a release window is open counts the live frames the
    window still lets in: the ring then never holds more than the larger of
    the two shares, whatever the VM does meanwhile."""
    from types import SimpleNamespace

    from netpass.destfeed import Replay
    from netpass.pacing import Window

    hold = SimpleNamespace(removed=False, stats=SimpleNamespace(rx_released_t=None))
    dn = SimpleNamespace(window=Window(granted=600, entered0=1000), hold=hold, live_enqueued=1100)
    assert Replay.granted_ahead(dn) == 500  # (100 of the 600 passed)
    dn.live_enqueued = 2000
    assert Replay.granted_ahead(dn) == 0  # used up
    dn.live_enqueued, hold.stats.rx_released_t = 1100, 1.0
    assert Replay.granted_ahead(dn) == 0  # the hold opened: no window any more
    assert Replay.granted_ahead(SimpleNamespace(window=None, hold=None, live_enqueued=0)) == 0


def _windowed(capacity: float, held: int = 4000, arrive: float = 12_000.0, stall_every: int = 0,
              stall_steps: int = 0, frame_ratio: float = 1.0,
              seconds: float = 3.0) -> tuple[int, int, float | None]:
    """A release, millisecond by millisecond, as the agent's loop runs it:
    a VM that reads up to ``capacity`` a second, live frames arriving in the
    hold at ``arrive``, and every ``stall_every`` steps a stall of
    ``stall_steps`` in which neither the VM nor the agent runs (a busy
    core).  Frames are ``frame_ratio`` times the size a window counts them
    as.  The fullest ring, the hold at the end, when it first
    emptied."""
    from netpass.pacing import RELEASE_STEP_S, Window, ask_hold, grant_needed, release_window, window_min

    ring, level, backlog, tokens, entered = 1000, 0, float(held), 0.0, 0
    top, emptied, step, stalled = 0, None, 0, 0
    w = Window(granted=0, entered0=0)
    ms_per_step = round(RELEASE_STEP_S * 1000)
    for ms in range(int(seconds * 1000)):
        backlog += arrive / 1000
        if ms % ms_per_step == 0:
            if stalled:
                stalled -= 1
            else:
                step += 1
                if stall_every and step % stall_every == 0:
                    stalled = stall_steps
                window, now = release_window(level, ring), ms / 1000
                due = grant_needed(window, ring, entered - w.entered0, w.granted)
                if not due and window >= window_min(ring) and ask_hold(w, entered, now):
                    w.asked_t, w.idle = now, backlog < 1
                    due = not w.idle
                w.entered_step = entered
                if due:
                    tokens, w.granted, w.entered0, w.idle = window / frame_ratio, window, entered, False
        moved = min(int(backlog), int(tokens))
        backlog, tokens, entered, level = backlog - moved, tokens - moved, entered + moved, level + moved
        top = max(top, level)
        if not stalled:
            level -= min(level, int(capacity / 1000))
        if emptied is None and backlog < 1:
            emptied = ms / 1000
    return top, int(backlog), emptied


@pytest.mark.parametrize("capacity", [20_000.0, 32_000.0, 90_000.0])
def test_a_windowed_release_drains_the_hold_within_the_ring(capacity: float) -> None:
    """4,000 held frames and 12,000 a second more: a VM that reads more than
    that empties the hold, and the ring never holds more than its window's
    top."""
    top, left, emptied = _windowed(capacity)
    assert top <= 625
    assert emptied is not None and left < 50
    if capacity >= 32_000:
        assert emptied < 0.5


@pytest.mark.parametrize("stall_steps", [5, 10, 30])
def test_a_stall_of_the_vm_and_the_agent_cannot_overflow_the_ring(stall_steps: int) -> None:
    """The VM and the agent stall together for 50-300 ms every 100 ms of
    work: with a pace the ring took the pace times the stall (911 frames
    over a 1,000-frame ring in 104 ms, lab); with a window, its top."""
    top, _left, _emptied = _windowed(32_000.0, stall_every=10, stall_steps=stall_steps)
    assert top <= 625


@pytest.mark.parametrize("frame_ratio,arrive,held", [(2.0, 12_000.0, 1000), (40.0, 500.0, 200)])
def test_a_window_of_larger_frames_goes_on(frame_ratio: float, arrive: float, held: int) -> None:
    """A window counts each frame as the largest (tbf's mpu); frames larger
    still (a GSO frame) pass fewer, and the release goes on: the hold is
    asked whether frames wait behind a window not half used."""
    top, _left, emptied = _windowed(32_000.0, held=held, arrive=arrive, frame_ratio=frame_ratio)
    assert top < 1000
    assert emptied is not None


