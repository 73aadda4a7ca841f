"""The strict-ordering hold on real taps, ifbs and a bridge, in a throw-away namespace.

No QEMU here: the test holds the tap's fd and plays the VM (reading what
the host queues toward it, writing what it sends).  The lab tests run the
same hold under real migrations.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netpass import hold, links, netns, rps, tapfd, tc
from netpass.errors import UsageError
from netpass.packet import Injector

VM = bytes.fromhex("020000000007")
PEER = bytes.fromhex("020000000009")
ROOT = Path(__file__).resolve().parent.parent


def frame(dst: bytes, src: bytes, n: int) -> bytes:
    return dst + src + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(50)


class Rig:
    """tap0 (the 'VM', our fd) and veth v0 on bridge br0; v1 is the 'peer'."""

    def __init__(self, state: Path) -> None:
        self.ns = f"nptest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.state = state
        netns.create(self.ns)
        self._ctx = netns.entered(self.ns)
        self._ctx.__enter__()
        self.fd = tapfd.open_tap("tap0", vnet_hdr=True)
        os.set_blocking(self.fd, False)
        links.set_up(None, "tap0")
        links.add_veth(None, "v0", None, "v1")
        links.add_bridge(None, "br0")
        links.enslave(None, "tap0", "br0")
        links.enslave(None, "v0", "br0")
        self.peer_rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.peer_rx.bind(("v1", 3))
        self.peer_rx.setblocking(False)
        self.live = Injector("v1", vnet_hdr=False, bypass=False)  # the network's frames
        self.replay = Injector("tap0")  # netpass's replay path
        self.vm_send(PEER, 0)  # the bridge learns the VM behind tap0
        time.sleep(0.05)
        self.from_vm()

    def vm_send(self, dst: bytes, n: int) -> None:
        os.write(self.fd, bytes(10) + frame(dst, VM, n))

    def to_vm(self) -> list[int]:
        """What reached the VM, by number (our own frames only)."""
        return [int.from_bytes(f[14:18], "big") for f in self.to_vm_all() if f[6:12] == PEER]

    def to_vm_all(self) -> list[bytes]:
        """Every frame that reached the VM."""
        out = []
        while True:
            try:
                out.append(os.read(self.fd, 4096)[10:])
            except BlockingIOError:
                return out

    def from_vm(self) -> list[int]:
        out = []
        while True:
            try:
                data = self.peer_rx.recv(4096)
            except BlockingIOError:
                return out
            if data[6:12] == VM:
                out.append(int.from_bytes(data[14:18], "big"))

    def leftovers(self) -> list[str]:
        found = [f"filter {d}" for d in ("ingress", "egress")
                 if {hold.PREF, hold.PASS_PREF, hold.MIRROR_PREF} & tc.filter_prefs(None, "tap0", d)]
        found += [n for n in links.names(None) if n.startswith(hold.IFB_PREFIX)]
        found += [p.name for p in (self.state).glob("*.json")]
        found += [f"tap0 {q} steered to {m}" for q, m in rps.masks(None, "tap0").items() if rps.mask_cpus(m)]
        return found

    def close(self) -> None:
        self.peer_rx.close()
        self.live.close()
        self.replay.close()
        os.close(self.fd)
        self._ctx.__exit__(None, None, None)
        netns.remove(self.ns)


@pytest.fixture
def rig(root_required: None, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "state" / "holds")
    try:
        yield r
    finally:
        r.close()


def test_rx_forwarded_frames_go_before_held_live_ones(rig: Rig) -> None:
    h = hold.Hold.install("s1", "tap0", rig.state, 1 << 20, 3000)
    h.close()
    for n in range(1, 301):
        rig.live.send(b"", frame(VM, PEER, n))  # newer frames, straight from the network
    time.sleep(0.1)
    assert rig.to_vm() == [], "a live frame passed the hold"
    for n in range(1000, 1010):
        rig.replay.send(bytes(10), frame(VM, PEER, n))  # the forwarded ones
    time.sleep(0.05)
    assert rig.to_vm() == list(range(1000, 1010))
    h.release_tx()
    h.release_rx(20000)
    got: list[int] = []
    deadline = time.monotonic() + 5
    while not h.rx_done() and time.monotonic() < deadline:
        got += rig.to_vm()
        time.sleep(0.005)
    for n in range(301, 311):
        rig.live.send(b"", frame(VM, PEER, n))
    time.sleep(0.05)
    got += rig.to_vm()
    assert got == list(range(1, 311)), "held frames lost, duplicated or out of order"
    assert h.stats.held_rx >= 300 and h.stats.dropped_rx == 0  # and the kernel's own IPv6 chatter
    h.remove(vm_running=False)
    assert rig.leftovers() == []
    assert not any(q.kind == "clsact" for q in tc.qdiscs(None, "tap0"))


@pytest.mark.parametrize("gap_frame", [False, True], ids=["quiet", "frame-at-the-close"])
def test_a_window_counts_frames_whatever_their_size(rig: Rig, gap_frame: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A release's window is frames (tbf's mpu makes each cost the largest):
    10 granted are 10 frames, of 68 bytes or of 1514, in order, none
    dropped as oversized; the rest waits for the next window.  (Paced in
    bytes from an average size, as before, an empty hold's estimate let
    1442-byte frames through at a ninth of the pace asked.)

    ``frame-at-the-close``: a frame arrives between the plug's change and
    its primers (the kernel's IPv6 chatter did, in 1 run of 30): it takes
    some of the bucket, the first primer then waits in the queue, and the
    first window must not count it as one of its frames (CI failed on it:
    8 of 10)."""
    if gap_frame:
        plug = tc.tbf_plug

        def plug_then_a_frame(*args: Any, **kwargs: Any) -> None:
            plug(*args, **kwargs)
            if not kwargs.get("mpu"):  # the close's plug, not a window
                rig.live.send(b"", frame(VM, PEER, 0))
                time.sleep(0.02)
        monkeypatch.setattr(tc, "tbf_plug", plug_then_a_frame)
    h = hold.Hold.install("s1", "tap0", rig.state, 1 << 22, 3000, tx=False)

    def window() -> tuple[int, list[int]]:
        """Frames that reached the VM (the kernel's own chatter too) and ours."""
        time.sleep(0.1)
        frames = rig.to_vm_all()
        return len(frames), [int.from_bytes(f[14:18], "big") for f in frames if f[6:12] == PEER]

    try:
        h.close()
        h.release_tx()
        time.sleep(0.05)
        rig.to_vm_all()  # what came before the hold closed
        for n in range(1, 81):  # full-size and small frames, mixed
            rig.live.send(b"", frame(VM, PEER, n) + bytes(1514 - 68 if n % 2 else 0))
        assert window() == (0, []) and h.rx_backlog()[0] >= 80
        h.release_rx(10, keep=True)
        n, ours = window()
        assert n == 10 and ours == list(range(1, len(ours) + 1))
        h.grant_rx(30)
        n, more = window()
        assert n == 30 and more == list(range(len(ours) + 1, len(ours) + len(more) + 1))
        h.grant_rx(1000)
        _n, rest = window()
        assert ours + more + rest == list(range(1, 81))
        assert h.rx_backlog()[0] == 0 and links.info(None, "tap0").tx_dropped == 0
    finally:
        h.remove(vm_running=True)


def test_tx_held_then_released_in_order_and_bridge_learns_then(rig: Rig) -> None:
    h = hold.Hold.install("s2", "tap0", rig.state, 1 << 20, 3000)
    subprocess.run(["bridge", "fdb", "del", VM.hex(":"), "dev", "tap0", "master"], capture_output=True)
    h.close()
    for n in range(1, 51):
        rig.vm_send(PEER, n)
    time.sleep(0.1)
    assert rig.from_vm() == [], "a guest frame passed the hold"
    fdb = subprocess.run(["bridge", "fdb", "show", "br", "br0"], capture_output=True, text=True).stdout
    assert VM.hex(":") not in fdb, "the bridge learnt the VM from a held frame"
    # QEMU's own announcement (RARP) is not held: the network learns at once.
    os.write(rig.fd, bytes(10) + b"\xff" * 6 + VM + b"\x80\x35" + bytes(46))
    time.sleep(0.05)
    rarp = []
    while True:
        try:
            rarp.append(rig.peer_rx.recv(4096))
        except BlockingIOError:
            break
    assert any(d[12:14] == b"\x80\x35" and d[6:12] == VM for d in rarp), "the RARP was held"
    h.release_tx()
    for n in range(51, 61):
        rig.vm_send(PEER, n)
    time.sleep(0.1)
    assert rig.from_vm() == list(range(1, 61))
    fdb = subprocess.run(["bridge", "fdb", "show", "br", "br0"], capture_output=True, text=True).stdout
    assert f"{VM.hex(':')} dev tap0" in fdb
    assert h.stats.held_tx >= 50
    h.remove(vm_running=True)
    assert rig.leftovers() == []
    # Deleting a qdisc on a live tap drops frames: the one netpass added stays, empty.
    assert any(q.kind == "clsact" for q in tc.qdiscs(None, "tap0"))


def test_no_hold_on_a_tap_already_held(rig: Rig) -> None:
    h = hold.Hold.install("s3", "tap0", rig.state, 1 << 20, 3000)
    try:
        with pytest.raises(UsageError, match="another netpass hold"):
            hold.Hold.install("s4", "tap0", rig.state, 1 << 20, 3000)
        with pytest.raises(UsageError, match="too long"):
            hold.Hold.install("s5", "tap0", rig.state, 1 << 20, 60_000)
    finally:
        h.remove(vm_running=False)
    assert rig.leftovers() == []


def test_no_redirect_outlives_its_ifb(rig: Rig) -> None:
    """Whatever went wrong before (here: the ifb deleted under the hold),
    the removal takes every filter of ours off the tap: a redirect to a
    deleted ifb drops every frame toward the VM (a busy CI: 6.5 s of them)."""
    h = hold.Hold.install("s6", "tap0", rig.state, 1 << 20, 1000, tx=False)
    h.close()
    links.delete(None, h.spec.ifb_rx)
    assert tc.filter_prefs(None, "tap0", "egress") >= {hold.PREF, hold.MIRROR_PREF}
    h.remove()
    assert rig.leftovers() == []
    rig.live.send(b"", frame(VM, PEER, 1))
    time.sleep(0.05)
    assert rig.to_vm() == [1]


def test_removal_waits_for_a_release_running_in_another_thread(rig: Rig) -> None:
    """The agent's removal may start while a cancelled release still works
    in its thread: the two take turns, and the held frames all go in, in
    order."""
    h = hold.Hold.install("s7", "tap0", rig.state, 1 << 20, 1000, tx=False)
    h.close()
    for n in range(1, 201):
        rig.live.send(b"", frame(VM, PEER, n))
    time.sleep(0.05)
    got: list[int] = []
    errors: list[Exception] = []

    def release() -> None:
        try:
            h.release_all(20, 2.0)
        except Exception as exc:  # noqa: BLE001 - the test's finding
            errors.append(exc)

    thread = threading.Thread(target=release)
    thread.start()
    h.remove()
    thread.join()
    assert errors == [], "the release and the removal ran at once"
    deadline = time.monotonic() + 2
    while len(got) < 200 and time.monotonic() < deadline:
        got += rig.to_vm()
        time.sleep(0.01)
    assert rig.leftovers() == []
    assert got == list(range(1, 201))


HOLDER = """
import sys, time
from pathlib import Path
from netpass import hold
h = hold.Hold.install("dead", "tap0", Path(sys.argv[1]), 1 << 20, 3000)
if sys.argv[2] == "guard":
    h.start_guard()
h.close()
print("closed", flush=True)
time.sleep(600)
"""


def _holder(rig: Rig, guard: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen(netns.exec_argv(rig.ns, [sys.executable, "-c", HOLDER, str(rig.state),
                                                     "guard" if guard else "none"]),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "closed"
    return proc


def test_guard_releases_and_removes_when_the_agent_dies(rig: Rig) -> None:
    proc = _holder(rig, guard=True)
    for n in range(1, 101):
        rig.live.send(b"", frame(VM, PEER, n))
    time.sleep(0.05)
    assert rig.to_vm() == []
    proc.send_signal(signal.SIGKILL)  # the process this test started, by pid
    proc.wait()
    got: list[int] = []
    deadline = time.monotonic() + 10
    while (rig.leftovers() or len(got) < 100) and time.monotonic() < deadline:
        got += rig.to_vm()
        time.sleep(0.02)
    got += rig.to_vm()
    assert rig.leftovers() == []
    assert got == list(range(1, 101)), "the guard lost or reordered held frames"


def test_restarted_agent_undoes_what_a_dead_one_left(rig: Rig, tmp_path: Path) -> None:
    proc = _holder(rig, guard=False)  # no guard: as if it died too
    for n in range(1, 21):
        rig.live.send(b"", frame(VM, PEER, n))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    assert rig.leftovers() != [], "nothing to recover: the test proves nothing"
    # A new agent on this host, with the same --state-dir, starts by undoing it.
    links.set_up(None, "lo")
    token = tmp_path / "token"
    token.write_text("5c0e9a3f71b2d846e3f1a07c9d25b6e84a1f3c0d7e962b5a8f4c1e07d3b69a2f")
    token.chmod(0o600)
    log = tmp_path / "agent.log"
    with open(log, "wb") as fh:
        agent = subprocess.Popen(
            netns.exec_argv(rig.ns, [sys.executable, "-m", "netpass.cli", "agent", "--listen", "127.0.0.1:7411",
                                     "--token-file", str(token), "--qmp-root", str(tmp_path),
                                     "--state-dir", str(rig.state.parent)]),
            stdout=fh, stderr=fh, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 30
        while b"agent listening" not in log.read_bytes() and time.monotonic() < deadline:
            assert agent.poll() is None, log.read_text()
            time.sleep(0.05)
        assert b"undid the hold of session dead" in log.read_bytes(), log.read_text()
    finally:
        agent.terminate()
        agent.wait(10)
    time.sleep(0.1)
    assert rig.to_vm() == list(range(1, 21))
    assert rig.leftovers() == []


def _mq_frame(seq: int, reply: bool = False) -> bytes:
    """An ICMP echo (or its reply) between 198.18.9.1 and the VM, 198.18.9.2:
    one flow either way (tun hashes it symmetrically)."""
    a, b = bytes([198, 18, 9, 1]), bytes([198, 18, 9, 2])
    src, dst = (b, a) if reply else (a, b)
    icmp = bytes([0 if reply else 8, 0, 0, 0, 0, 77]) + seq.to_bytes(2, "big") + bytes(56)
    ip = bytes([0x45, 0, 0, 20 + len(icmp), 0, 0, 0, 0, 64, 1, 0, 0]) + src + dst
    return ((PEER + VM) if reply else (VM + PEER)) + b"\x08\x00" + ip + icmp


def test_queue_pin_keeps_a_flow_in_one_queue_and_any_process_undoes_it(root_required: None,
                                                                       tmp_path: Path) -> None:
    """tun follows a flow to the queue its VM last sent it on; pinned, every
    frame goes to queue 0 whatever the VM sends; the pin is undone by a Hold
    built from the state file alone (what the guard does), via QEMU's pid
    and fd (here: ours)."""
    from netpass.packet import TxRing

    ns = f"nptest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    try:
        with netns.entered(ns):
            fds = [tapfd.open_tap("tq", vnet_hdr=True, multi_queue=True) for _ in range(4)]
            for fd in fds:
                os.set_blocking(fd, False)
            links.set_up(None, "tq")
            ring = TxRing("tq")

            def send_and_see(seqs: range) -> set[int]:
                assert ring.send([bytes(10) + _mq_frame(s) for s in seqs]) == len(seqs)
                time.sleep(0.02)
                queues = set()
                for q, fd in enumerate(fds):
                    while True:
                        try:
                            data = os.read(fd, 4096)[10:]
                        except BlockingIOError:
                            break
                        if data[12:14] == b"\x08\x00" and data[34] == 8:
                            queues.add(q)
                return queues

            def vm_sends_on(q: int) -> None:
                os.write(fds[q], bytes(10) + _mq_frame(0, reply=True))

            vm_sends_on(3)
            assert send_and_see(range(10)) == {3}, "tun no longer follows the VM's queue: see agent._pin_queue"
            h = hold.Hold.install("s9", "tq", tmp_path, 1 << 20, 3000, False)
            try:
                h.pin_queue(fds[1], os.getpid(), fds[2])
                vm_sends_on(2)
                assert send_and_see(range(10, 20)) == {0}
                spec = hold.HoldSpec.load(h.path)
                assert spec.queue_pin == [os.getpid(), fds[2]]
                hold.Hold(spec, tmp_path).remove(False)  # as the guard would
                vm_sends_on(1)
                assert send_and_see(range(20, 30)) == {1}, "the pin outlived the hold"
            finally:
                h.remove(False)
            ring.close()
            for fd in fds:
                os.close(fd)
    finally:
        netns.remove(ns)


def _bridged_hops(start: str, hops: int) -> socket.socket:
    """``hops`` bridges and veths after ``start`` (each hop queues a frame in
    a CPU's input backlog), and a socket that reads what comes out."""
    prev = start
    for k in range(hops):
        links.add_bridge(None, f"hb{k}")
        links.add_veth(None, f"ha{k}", None, f"hz{k}")
        links.enslave(None, prev, f"hb{k}")
        links.enslave(None, f"ha{k}", f"hb{k}")
        links.set_up(None, f"hz{k}")
        prev = f"hz{k}"
    end = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    end.bind((prev, 3))
    end.setblocking(False)
    end.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
    return end


def _from_vm(end: socket.socket) -> list[int]:
    """The numbers of the 'VM's frames that came out at ``end`` so far, in order."""
    out = []
    while True:
        try:
            data = end.recv(4096)
        except BlockingIOError:
            return out
        if data[6:12] == VM:
            out.append(int.from_bytes(data[14:18], "big"))


def _busy_on(cpu: int) -> subprocess.Popen[bytes]:
    """A process that keeps ``cpu`` busy for a minute at most (killed by its caller)."""
    return subprocess.Popen([sys.executable, "-c", f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
                             "t = time.monotonic() + 60\nwhile time.monotonic() < t: pass"])


def _vm_sender(fd: int, cpu: int, cap: int = 200_000, bound_s: float = 20.0) -> tuple[int, int]:
    """A 'VM' in a process of its own, as QEMU is: it writes numbered
    frames into the tap from ``cpu``, one every 100 us, until told to stop
    (a byte on the pipe whose write end is returned with its pid), or
    ``cap`` frames, or ``bound_s``.  It exits 0 when told, 3 otherwise."""
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child: no pytest, no threads; it leaves by os._exit only)
        code = 3
        try:
            os.close(stop_w)
            os.set_blocking(stop_r, False)
            os.sched_setaffinity(0, {cpu})
            end = time.monotonic() + bound_s
            n = 0
            while n < cap and time.monotonic() < end:
                try:
                    if os.read(stop_r, 1):
                        code = 0
                        break
                except BlockingIOError:
                    pass
                n += 1
                os.write(fd, bytes(10) + frame(PEER, VM, n))
                until = time.perf_counter() + 0.0001
                while time.perf_counter() < until:
                    pass
        finally:
            os._exit(code)
    os.close(stop_r)
    return pid, stop_w


def test_a_released_tx_burst_keeps_its_order_across_cpus(rig: Rig) -> None:
    """The held TX leaves from the ifb's tasklet, on whichever CPU it ran;
    each veth hop after it queues a frame in that CPU's backlog.  While the
    released burst waits there, the VM's next frames may run the tasklet on
    the other CPU and overtake it.  The hold steers the tap's receive
    queues (RPS) so a flow keeps one CPU's backlog.  Here: five bridged
    veth hops, one core kept busy, the 'VM' (a process of its own) sending
    from the other core throughout, while its held frames are released from
    the busy one and the steering goes.  Without the steering, 3 of 5 runs
    of this test failed (and 0 of 13 with it); so it fails only sometimes
    without it, and its other checks are that the steering is set and
    given back.
    (The 'VM' was a thread of this process until 2026-12-03, and its cap of
    20,000 frames often came before the release ended; docs/results.md,
    "An open bug".)"""
    cpus = sorted(os.sched_getaffinity(0))
    before = rps.masks(None, "tap0")
    assert before, "no receive packet steering in this kernel: a released TX burst may be reordered"
    end = _bridged_hops("v1", 5)
    busy = _busy_on(cpus[0])
    reordered: list[tuple[int, int]] = []
    try:
        for trial in range(12):
            h = hold.Hold.install(f"s{trial}", "tap0", rig.state, 1 << 22, 3000)
            try:
                assert [rps.mask_cpus(m) for m in rps.masks(None, "tap0").values()] == [set(cpus)]
                h.close()
                mine = os.sched_getaffinity(0)
                pid, stop = _vm_sender(rig.fd, cpus[-1])
                os.sched_setaffinity(0, {cpus[0]})
                try:
                    time.sleep(0.04)
                    h.release_tx()
                    time.sleep(0.05)
                finally:
                    os.write(stop, b"x")
                    os.close(stop)
                    status = os.waitpid(pid, 0)[1]
                    os.sched_setaffinity(0, mine)
                assert os.waitstatus_to_exitcode(status) == 0, "the 'VM' stopped sending before the release ended"
                time.sleep(0.1)
            finally:
                h.remove(vm_running=True)
            assert rps.masks(None, "tap0") == before
            top = 0
            for n in _from_vm(end):
                if n < top:
                    reordered.append((n, top))
                top = max(top, n)
    finally:
        busy.kill()
        busy.wait()
        end.close()
    assert reordered == [], f"{len(reordered)} frame(s) overtaken, the first {reordered[0]} (frame, by)"
    assert rig.leftovers() == []


def test_a_large_held_tx_burst_is_not_dropped_by_the_input_backlog(rig: Rig) -> None:
    """The released TX leaves the ifb into the receive path, where RPS
    queues one flow's frames in one CPU's input backlog, which drops past
    net.core.netdev_max_backlog (1,000).  Let go at once, a strict hold of
    1,443 transmissions lost 608 there in the lab, and the report said
    nothing.  Paced at 100,000 frames/s, a fresh-clone CI lost 66-888 of
    4,000 here in 7 of 8 releases (and this machine 240-627 in 1-2 releases
    in 3 runs of 4): the backlog drains slower than that when the softirqs
    share a busy core.
    The release now goes in windows, each once the backlogs have room
    (hold._release_tx_windows), and the report counts such drops.  Here:
    4,000 held frames through five bridged veth hops, released from a busy
    core, eight times."""
    cpus = sorted(os.sched_getaffinity(0))
    end = _bridged_hops("v1", 5)
    busy = _busy_on(cpus[0])
    short: list[tuple[int, int, int]] = []  # (trial, arrived, backlog drops counted)
    try:
        for trial in range(8):
            h = hold.Hold.install(f"b{trial}", "tap0", rig.state, 1 << 24, 3000)
            try:
                h.close()
                for n in range(1, 4001):
                    rig.vm_send(PEER, n)
                mine = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {cpus[0]})
                try:
                    h.release_tx()
                finally:
                    os.sched_setaffinity(0, mine)
                time.sleep(0.2)
            finally:
                h.remove(vm_running=True)
            arrived = _from_vm(end)
            assert h.stats.held_tx == 4000
            if arrived != list(range(1, 4001)):
                short.append((trial, len(arrived), h.stats.backlog_dropped))
    finally:
        busy.kill()
        busy.wait()
        end.close()
    assert short == [], f"released bursts that did not all arrive in order (trial, arrived, counted): {short}"
    assert rig.leftovers() == []
