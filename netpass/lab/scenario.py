"""Lab scenarios: one real migration with a prober running, measured."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import links, netns
from ..errors import LabError, MigrationFailed, QMPError
from ..migration import MigrationOptions, MigrationResult, migrate
from ..qmp import Monitor
from ..watch import AtPreSwitchover, Completed, Stopped, Watch
from .image import GuestImage
from .topology import GUEST_IP, GUEST_MAC, MIG_DST, PEER_MAC, Lab
from .vm import _die_with

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class ScenarioOptions:
    rate: float = 2000.0
    proto: str = "icmp"
    switchover_pause_ms: int = 200
    lan_lag_ms: int = 0
    kill_source: bool = False
    warmup_s: float = 1.0
    tail_s: float = 1.0
    max_duration_s: float = 120.0
    downtime_limit_ms: int | None = None
    timeline_path: Path | None = None
    mode: str = "baseline"
    migrate_args: tuple[str, ...] = ()
    token_override: bytes | None = None
    on_pre_switchover: str = "continue"
    agent_addr: str | None = None
    kill_agent_at_stop: bool = False
    kill_agent_after_resume_ms: int | None = None
    metrics: bool = False
    agent_argv: tuple[str, ...] | None = None  # run this agent instead (the Ansible test's)
    burst_frames: int = 0  # sent to the VM by the peer while the source is stopped: a backlog
    burst_ms: int = 250  # spread over this long, from the stop
    queues: int = 1  # the VM's NIC queues (and vCPUs)
    frame_size: int = 98  # the probes' frame size, bytes
    tcp_rate_mbit: float = 20.0  # proto "tcp": the bulk flow's pace
    flood_pps: int = 0  # frames per second to the VM from the peer, all along (the guest drops them)
    max_bandwidth_mib: int | None = None  # QEMU's max-bandwidth, MiB/s (both modes): a longer migration
    busy_core: bool = False  # one core kept busy by an unrelated process, all along
    # "external": the lab, as a management layer, stops the source VM itself
    # mid-migration (at a third of the RAM left) and resumes the destination.
    stopper: str = "netpass"
    endgame: bool = True  # False: netpass does not plan the park, so QEMU's own stop comes unforeseen
    fault: str | None = None  # one of FAULTS (netpass mode)

    @property
    def stop_at_remaining(self) -> float | None:
        return STOP_AT_REMAINING if self.stopper == "external" else None


STOP_AT_REMAINING = 1 / 3

# The faults a netpass scenario can inject, each at its moment.
FAULTS = {
    "cut-before-completion": "drop the channel's packets silently, 0.3 s into the migration",
    "cut-after-completion": "drop the channel's packets silently at the destination's resume",
    "dst-qemu-killed": "SIGKILL the destination QEMU 20 ms after its resume, during the replay",
    "migrate-sigkill-at-stop": "SIGKILL 'netpass migrate' at the source's stop",
    "migrate-sigterm-midway": "SIGTERM 'netpass migrate' 0.3 s into the migration",
    "migrate-sigkill-midway": "SIGKILL 'netpass migrate' 0.3 s into the migration",
    "preauth-attack": "200 connections without the token at the agent, from 4 local addresses, "
                      "held open from before 'netpass migrate' starts to its end",
}
BUSY_PROGRAM = ("import sys, time\n"
                "end = time.monotonic() + float(sys.argv[1])\n"
                "while time.monotonic() < end:\n"
                "    pass\n")


def _wall_to_mono(t: float | None) -> float | None:
    """A wall-clock time (another process's, on this host) on our monotonic clock."""
    return None if t is None else t - (time.time() - time.monotonic())


def _prober_argv(lab: Lab, opts: ScenarioOptions, duration: float, timeline: Path | None,
                 rate: float | None = None, stop_on_stdin: bool = True) -> list[str]:
    if opts.proto == "tcp" and rate is None:
        return netns.exec_argv(lab.ns("peer"), [
            sys.executable, "-m", "netpass.lab.tcpflow", "--target", GUEST_IP,
            "--rate-mbit", str(opts.tcp_rate_mbit), "--duration", str(duration), "--stop-on-stdin"])
    proto = "icmp" if opts.proto == "tcp" else opts.proto
    argv = [sys.executable, "-m", "netpass.lab.prober", "--target", GUEST_IP,
            "--rate", str(rate or opts.rate), "--duration", str(duration), "--proto", proto,
            "--size", str(opts.frame_size if rate is None else 98)]
    if stop_on_stdin:
        argv.append("--stop-on-stdin")
    if timeline is not None:
        argv += ["--timeline", str(timeline)]
    return netns.exec_argv(lab.ns("peer"), argv)


def wait_reachable(lab: Lab, opts: ScenarioOptions, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(_prober_argv(lab, opts, 0.3, None, rate=50, stop_on_stdin=False),
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and json.loads(out.stdout)["received"] > 0:
            return
        time.sleep(0.2)
    raise LabError(f"the guest at {GUEST_IP} does not answer the peer")


def run_migration_scenario(image: GuestImage, opts: ScenarioOptions, say: Say,
                           lab_hook: Callable[[Lab], Any] | None = None) -> dict[str, Any]:
    """Build a lab, migrate once under probe traffic, tear it all down."""
    with Lab(image) as lab:
        say(f"lab {lab.run_id}: booting the guest under TCG" +
            (f" ({opts.queues} queues)" if opts.queues > 1 else ""))
        t0 = time.monotonic()
        lab.start_vms(queues=opts.queues)
        assert lab.src_vm is not None and lab.dst_vm is not None

        async def cont() -> None:
            async with Monitor(lab.src_vm.qmp, "src") as mon:  # type: ignore[union-attr]
                await mon.execute("cont")

        asyncio.run(cont())
        lab.src_vm.wait_ready()
        wait_reachable(lab, opts)
        say(f"guest up after {time.monotonic() - t0:.1f} s; probing at {opts.rate:.0f} pps")
        if lab_hook is not None:
            lab_hook(lab)
        # The guest's counters before the probing (the reachability checks
        # above count too), so that the run's own numbers are a difference.
        _await_fresh_counters([lab.src_vm.console])
        guest_base = guest_counters([lab.src_vm.console])
        if opts.lan_lag_ms > 0:
            # The LAN keeps delivering to the source until we let it learn.
            links.pin_mac(lab.ns("lan"), "p-src", GUEST_MAC)
        timeline = opts.timeline_path
        busy = flood = agent = None
        if opts.mode == "netpass":
            agent = start_agent(lab, opts)
        if opts.busy_core:
            busy = subprocess.Popen([sys.executable, "-c", BUSY_PROGRAM, str(opts.max_duration_s)],
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid()))
        if opts.flood_pps:
            flood = subprocess.Popen(netns.exec_argv(lab.ns("peer"), [
                sys.executable, "-m", "netpass.lab.flood", "--ifname", "eth0", "--dst-mac", GUEST_MAC,
                "--src-mac", PEER_MAC, "--pps", str(opts.flood_pps), "--duration", str(opts.max_duration_s),
                "--stop-on-stdin"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        prober = subprocess.Popen(_prober_argv(lab, opts, opts.max_duration_s, timeline),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        probe_t0 = time.monotonic()
        dst0 = links.info(lab.ns("dst"), "tap0")
        try:
            time.sleep(opts.warmup_s)
            say("migrating" + (" with netpass" if opts.mode == "netpass" else ""))
            if opts.mode == "netpass":
                assert agent is not None
                result, report = asyncio.run(_drive_netpass(lab, opts, say, agent))
            else:
                result, report = asyncio.run(_drive(lab, opts, say)), None
            if opts.on_pre_switchover == "cancel":
                # The source resumes; give it time to answer what it holds.
                time.sleep(0.5)
            if opts.lan_lag_ms > 0:
                # (No resume: the migration failed, and the VM is still where the LAN sends.)
                wait = (0.0 if result.dst_resume_t is None else
                        result.dst_resume_t + opts.lan_lag_ms / 1000 - time.monotonic())
                if wait > 0:
                    time.sleep(wait)
                links.unpin_mac(lab.ns("lan"), "p-src", GUEST_MAC)
            time.sleep(opts.tail_s)
            where = asyncio.run(_where(lab))
        finally:
            out, err = prober.communicate(timeout=60)
            flood_out = flood.communicate(timeout=60)[0] if flood is not None else b""
            if agent is not None:
                stop_agent(agent)
            if busy is not None:
                busy.terminate()
                busy.wait()
        if prober.returncode != 0:
            raise LabError(f"prober failed: {err.decode()[-500:]}")
        # Everything the destination tap's ring dropped during the run, the
        # session's share (dest_ring_overflow) and the VM's own after it; and
        # its ring's size, which netpass changes only while it holds.
        dst_dropped = dst_ring = None
        if links.exists(lab.ns("dst"), "tap0"):  # (gone with a QEMU that exited)
            dst1 = links.info(lab.ns("dst"), "tap0")
            dst_dropped, dst_ring = dst1.tx_dropped - dst0.tx_dropped, dst1.txqueuelen
        dst_exit = lab.dst_vm.proc.poll() if lab.dst_vm.proc else None
        _await_fresh_counters([vm.console for vm in (lab.src_vm, lab.dst_vm) if vm.alive()])
        guest = guest_counters([lab.src_vm.console, lab.dst_vm.console])
        dst_trace = guest_fault_trace(lab.dst_vm.console)
        dst_fault = guest_fault_line(dst_trace)
        stats: dict[str, Any] = json.loads(out)
        stats["proto"] = opts.proto
        if flood is not None:
            stats.update(json.loads(flood_out))
        stats["queues"] = opts.queues
        stats["busy_core"] = opts.busy_core
        stats["stopper"] = opts.stopper
        stats["downtime_ms"] = result.downtime_ms
        stats["total_time_ms"] = result.total_time_ms
        stats["switchover_pause_ms"] = opts.switchover_pause_ms
        stats["lan_lag_ms"] = opts.lan_lag_ms
        stats["kill_source"] = opts.kill_source
        stats["dst_qemu_exit"] = dst_exit
        stats["src_status"], stats["dst_status"] = where
        for k, v in guest.items():
            base = guest_base.get(k)
            stats[k] = v - base if v is not None and base is not None else None

        def rel(t: float | None) -> float | None:
            return None if t is None else round((t - probe_t0) * 1000, 1)

        stats["dst_tap_dropped"] = dst_dropped
        stats["dst_leftovers"] = result.dst_leftovers + (
            [f"tap0's ring left at {dst_ring} frames (it had {dst0.txqueuelen})"]
            if dst_ring is not None and dst_ring != dst0.txqueuelen else [])
        stats["src_leftovers"] = result.src_leftovers
        if opts.metrics:
            stats["metrics_before"], stats["metrics_after"] = result.metrics_before, result.metrics_after
        stats["dst_guest_fault"] = dst_fault
        stats["dst_guest_fault_trace"] = dst_trace
        stats["src_stop_ms"] = rel(result.src_stop_t)
        # The traffic programs' own times, on this clock (they start a little
        # after probe_t0: their own offsets would be early by that much).
        stats["lost_runs_ms"] = [[rel(a / 1e9), rel(b / 1e9), n] for a, b, n in stats.pop("lost_runs", [])]
        # [id, received (ms), highest id received before it]
        stats["reorders_ms"] = [[i, rel(rx / 1e9), top] for i, rx, top in stats.pop("reorders", [])]
        for edge in ("first", "last"):
            if stats.get(f"{edge}_lost_sent_ns") is not None:
                stats[f"{edge}_lost_sent_ms"] = rel(stats[f"{edge}_lost_sent_ns"] / 1e9)
        if stats.get("stall_start_mono") is not None:
            stats["stall_start_ms"] = rel(stats.pop("stall_start_mono"))
        if opts.burst_frames:
            stats["burst_sent"] = result.burst_sent
            stats["burst_end_ms"] = rel(result.burst_end_t)
        stats["dst_resume_ms"] = rel(result.dst_resume_t)
        # The network's pause: from the last moment a frame could reach the
        # VM on the source (netpass's park, or QEMU's stop if it came first)
        # to the destination VM running, on QEMU's own clocks where it can.
        parked = (report or {}).get("times_wall", {}).get("parked")
        starts = [t for t in (result.src_stop_t, _wall_to_mono(parked)) if t is not None]
        stats["pause_start_ms"] = rel(min(starts)) if starts else None
        stats["network_pause_ms"] = (round((result.dst_resume_t - min(starts)) * 1000, 1)
                                     if starts and result.dst_resume_t is not None else None)
        # TCP: from the moment the destination VM held every segment meant for
        # it and netpass held none of its own frames (its resume, plus the
        # replay's delay or, strict, the TX hold's end if later) to the end of
        # the stall, when the sender saw the VM acknowledge them: the guest's
        # own time to answer after a resume, in which netpass has no part
        # (see the TCP stall in docs/results.md).
        rep = report or {}
        start, stall, resume = stats.get("stall_start_ms"), stats.get("stall_ms"), stats["dst_resume_ms"]
        replay = rep.get("replay_delay_ms")
        stats["guest_ack_lag_ms"] = (
            None if start is None or stall is None or resume is None or replay is None
            else round(start + stall - resume - max(replay, rep.get("hold_tx_ms") or 0.0), 1))
        if report is not None:
            stats["report"] = report
        return stats


async def _drive(lab: Lab, opts: ScenarioOptions, say: Say) -> MigrationResult:  # baseline
    assert lab.src_vm is not None and lab.dst_vm is not None
    mopts = MigrationOptions(uri=lab.migration_uri, switchover_pause_ms=opts.switchover_pause_ms,
                             downtime_limit_ms=opts.downtime_limit_ms,
                             max_bandwidth=opts.max_bandwidth_mib << 20 if opts.max_bandwidth_mib else None,
                             cancel_at_pre_switchover=opts.on_pre_switchover == "cancel",
                             stop_at_remaining=opts.stop_at_remaining)
    burst = MigrationResult()  # what the burst did, if any
    burst_task: asyncio.Task[None] | None = None

    async def on_stop() -> None:
        nonlocal burst_task
        burst_task = asyncio.get_running_loop().create_task(_burst(lab, opts, burst))

    async with Monitor(lab.src_vm.qmp, "src") as src, Monitor(lab.dst_vm.qmp, "dst") as dst:
        try:
            result = await migrate(src, dst, mopts, on_stop=on_stop if opts.burst_frames else None)
            if burst_task is not None:
                await burst_task
                result.burst_sent, result.burst_end_t = burst.burst_sent, burst.burst_end_t
        except MigrationFailed as exc:
            if opts.on_pre_switchover != "cancel":
                raise
            say(f"migration cancelled at pre-switchover, as asked: {exc}")
            result = MigrationResult(status="cancelled")
            return result
    say(f"migration completed: QEMU downtime {result.downtime_ms} ms, total {result.total_time_ms} ms")
    if opts.kill_source:
        lab.src_vm.kill()
    return result


AGENT_PORT = 7411
METRICS_PORT = 9411


def _cli(lab: Lab, role: str, *args: str) -> list[str]:
    return netns.exec_argv(lab.ns(role), [sys.executable, "-m", "netpass.cli", *args])


STRANGER_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


async def _start_strangers(lab: Lab, say: Say) -> asyncio.subprocess.Process:
    """The pre-auth attack, from the agent's own host (loopback sources),
    in place before the real client connects."""
    argv = [sys.executable, "-m", "netpass.lab.stranger", "--target", f"{MIG_DST}:{AGENT_PORT}",
            "--count", "200", "--hold-s", "240"]
    for src in STRANGER_SOURCES:
        argv += ["--source", src]
    proc = await asyncio.create_subprocess_exec(*netns.exec_argv(lab.ns("dst"), argv),
                                                stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            line = await proc.stdout.readline()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabError("the strangers did not connect within 60 s") from None
    if not line:
        await proc.wait()
        raise LabError(f"the strangers failed (exit {proc.returncode})")
    say(f"lab: strangers at the agent: {line.decode().strip()}")
    return proc


async def _end_strangers(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    try:
        async with asyncio.timeout(10):
            out = await proc.stdout.read()
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": "the strangers did not end"}
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": f"exit {proc.returncode}"}


class _LateLan:
    """The LAN keeps delivering to the source until ``lag_ms`` after the resume."""

    def __init__(self, lab: Lab, lag_ms: int) -> None:
        self.lab, self.lag_ms = lab, lag_ms
        self.done = lag_ms <= 0

    def step(self, resumed_t: float | None, migration_over: bool) -> None:
        if self.done:
            return
        if resumed_t is not None and time.monotonic() >= resumed_t + self.lag_ms / 1000:
            # It learns, late, where the VM is now: the entry moves to the
            # destination's port.  (Deleting it made the LAN flood the VM's
            # frames to both hosts until it learned again: on a busy core
            # for ~80 ms, copies the source counted lost once its agent was
            # gone.)
            links.move_mac(self.lab.ns("lan"), "p-dst", GUEST_MAC)
            self.done = True
        elif resumed_t is None and migration_over:
            links.unpin_mac(self.lab.ns("lan"), "p-src", GUEST_MAC)
            self.done = True  # the migration failed: nothing resumed


async def _on_src_event(ev: Any, watch: Watch, lab: Lab, opts: ScenarioOptions, res: MigrationResult,
                        sw: Monitor, agent: subprocess.Popen[bytes], say: Say) -> None:
    """Play the management layer on the source's watch socket (what each
    event means is watch.py's to say, as for netpass migrate)."""
    if ev is None:
        return
    assert lab.src_vm is not None
    res.events.append((ev.received, "src", ev.name + ":" + str(ev.data.get("status", ""))))
    for fact in watch.event(ev.name, ev.data, ev.emitted):
        if isinstance(fact, Stopped) and fact.emitted is not None and res.src_stop_t is None:
            res.src_stop_t = fact.emitted  # the STOP event's own time
            if opts.burst_frames:
                task = asyncio.get_running_loop().create_task(_burst(lab, opts, res))
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
            if opts.kill_agent_at_stop and agent.poll() is None:
                await asyncio.sleep(0.05)  # let some frames cross first
                say("lab: killing the destination agent")
                agent.kill()
        elif isinstance(fact, AtPreSwitchover):
            await asyncio.sleep(opts.switchover_pause_ms / 1000)
            try:
                if opts.on_pre_switchover == "cancel":
                    say("lab: cancelling the migration at pre-switchover")
                    await sw.execute("migrate_cancel")
                else:
                    await sw.execute("migrate-continue", {"state": "pre-switchover"})
            except QMPError as exc:  # e.g. netpass cancelled it meanwhile
                say(f"lab: pre-switchover action refused: {exc}")
        elif isinstance(fact, Completed):
            res.completed_t = fact.emitted
            if opts.kill_source and lab.src_vm.proc is not None and lab.src_vm.alive():
                lab.src_vm.proc.kill()  # at once, as libvirt does (SIGKILL)


class _Manager:
    """The rest of the management layer the lab plays on the watch sockets:
    kill the source the moment ``query-migrate`` (polled every few ms) says
    completed; or, as an external stopper, stop the source VM mid-migration
    and resume the destination, which then comes up paused."""

    def __init__(self, lab: Lab, opts: ScenarioOptions, res: MigrationResult, sw: Monitor, dw: Monitor,
                 say: Say) -> None:
        self.lab, self.opts, self.res, self.sw, self.dw, self.say = lab, opts, res, sw, dw, say
        self.active = opts.kill_source or opts.stopper == "external"
        self.stopped = self.resumed = False
        self.completed = False

    async def step(self) -> None:
        if not self.active or self.completed:
            return
        try:
            info = await self.sw.execute("query-migrate")
        except QMPError:
            return
        ram = info.get("ram", {})
        frac = self.opts.stop_at_remaining
        if frac is not None and not self.stopped and info.get("status") == "active" and ram.get("total") \
                and ram.get("remaining", 0) <= frac * ram["total"]:
            self.say("lab: the management layer stops the source VM")
            await self.sw.execute("stop")
            self.stopped = True
        if info.get("status") == "completed":
            self.completed = True
            if self.opts.kill_source and self.lab.src_vm is not None and self.lab.src_vm.alive():
                assert self.lab.src_vm.proc is not None
                self.lab.src_vm.proc.kill()  # SIGKILL, at once

    async def resume_destination(self) -> None:
        if not self.stopped or self.resumed:
            return
        try:
            status = await self.dw.status()
        except QMPError:
            return
        if status == "paused":
            await self.dw.execute("cont")
            self.resumed = True


BURST_ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental: the guest drops it on arrival


async def _burst(lab: Lab, opts: ScenarioOptions, res: MigrationResult) -> None:
    """From the peer, ``burst_frames`` frames to the VM while its source is
    stopped: the backlog netpass must carry across.  Paced in chunks over
    ``burst_ms`` (each chunk fits the source tap's ring), bounded in count
    and time.  The guest has no handler for the EtherType: it takes and drops
    them, so what is measured is how fast the VM consumes its NIC."""
    from ..packet import TxRing

    dst = bytes.fromhex(GUEST_MAC.replace(":", ""))
    src = bytes.fromhex(PEER_MAC.replace(":", ""))
    with netns.entered(lab.ns("peer")):
        ring = TxRing("eth0")
    try:
        total, chunk = opts.burst_frames, 500
        steps = max(1, -(-total // chunk))
        interval = opts.burst_ms / 1000 / steps
        deadline = time.monotonic() + opts.burst_ms / 1000 + 2.0
        sent = 0
        while sent < total and time.monotonic() < deadline:
            n = min(chunk, total - sent)
            recs = [bytes(10) + dst + src + BURST_ETHERTYPE + (sent + i).to_bytes(4, "big") + bytes(42)
                    for i in range(n)]
            done = 0
            while done < n and time.monotonic() < deadline:
                done += ring.send(recs, done)
                if done < n:
                    await asyncio.sleep(0.001)
            sent += done
            res.burst_sent = sent
            await asyncio.sleep(interval)
        res.burst_end_t = time.monotonic()
    finally:
        ring.close()


def start_agent(lab: Lab, opts: ScenarioOptions) -> subprocess.Popen[bytes]:
    """'netpass agent' on the destination host, as a daemon runs there:
    started before the traffic (its start-up is not the migration's)."""
    import secrets

    token = lab.rundir / "token"
    token.write_text(secrets.token_hex(32))
    os.chmod(token, 0o600)
    agent_log = lab.rundir / "agent.log"
    agent_cmd = (netns.exec_argv(lab.ns("dst"), list(opts.agent_argv)) if opts.agent_argv else
                 _cli(lab, "dst", "-v", "agent", "--listen", f"{MIG_DST}:{AGENT_PORT}",
                      "--token-file", str(token), "--qmp-root", str(lab.rundir),
                      "--state-dir", str(lab.rundir / "state"),
                      *(("--metrics-listen", f"{MIG_DST}:{METRICS_PORT}") if opts.metrics else ())))
    with open(agent_log, "wb") as alog:
        agent = subprocess.Popen(agent_cmd, stdin=subprocess.DEVNULL, stdout=alog, stderr=alog)
    deadline = time.monotonic() + 30
    while "agent listening" not in agent_log.read_text(errors="replace"):
        if agent.poll() is not None:
            raise LabError(f"the agent exited: {agent_log.read_text(errors='replace')[-800:]}")
        if time.monotonic() > deadline:
            agent.kill()
            agent.wait()
            raise LabError("the agent did not start within 30 s")
        time.sleep(0.05)
    return agent


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


class _Faults:
    """Inject ``opts.fault`` at its moment (see FAULTS)."""

    CUT = ("table inet nplabcut {\n"
           f" chain in {{ type filter hook input priority 0; tcp dport {AGENT_PORT} drop; }}\n"
           f" chain out {{ type filter hook output priority 0; tcp sport {AGENT_PORT} drop; }}\n"
           "}\n")

    def __init__(self, lab: Lab, opts: ScenarioOptions, say: Say) -> None:
        self.lab, self.fault, self.say = lab, opts.fault, say
        self.migrate: asyncio.subprocess.Process | None = None
        self.done = opts.fault is None
        self.active_t: float | None = None

    async def _cut(self) -> None:
        from .. import nft

        self.say("lab: cutting the channel silently (nft drop on the agent's port)")
        await asyncio.to_thread(nft.run, self.lab.ns("dst"), self.CUT)

    def _signal(self, sig: int) -> None:
        if self.migrate is not None and self.migrate.returncode is None:
            self.say(f"lab: {signal.Signals(sig).name} to netpass migrate")
            self.migrate.send_signal(sig)

    async def step(self, src_event: str | None, dst_resumed: bool) -> None:
        if self.done:
            return
        if src_event == "MIGRATION:active" and self.active_t is None:
            self.active_t = time.monotonic()
        early = self.active_t is not None and time.monotonic() >= self.active_t + 0.3
        if self.fault == "cut-before-completion" and early:
            await self._cut()
        elif self.fault == "migrate-sigterm-midway" and early:
            self._signal(signal.SIGTERM)
        elif self.fault == "migrate-sigkill-midway" and early:
            self._signal(signal.SIGKILL)
        elif self.fault == "migrate-sigkill-at-stop" and src_event == "STOP:":
            self._signal(signal.SIGKILL)
        elif self.fault == "cut-after-completion" and dst_resumed:
            await self._cut()
        elif self.fault == "dst-qemu-killed" and dst_resumed:
            await asyncio.sleep(0.02)
            self.say("lab: killing the destination QEMU during the replay")
            assert self.lab.dst_vm is not None and self.lab.dst_vm.proc is not None
            self.lab.dst_vm.proc.kill()
        else:
            return
        self.done = True


async def _migration_over(sw: Monitor, lab: Lab) -> bool:
    """Whether the source QEMU's migration has ended (or the QEMU is gone)."""
    assert lab.src_vm is not None
    if not lab.src_vm.alive():
        return True
    try:
        info = await sw.execute("query-migrate")
    except QMPError:
        return True
    return info.get("status") not in ("setup", "active", "pre-switchover", "device", "postcopy-active",
                                      "cancelling", "wait-unplug")


async def _drive_netpass(lab: Lab, opts: ScenarioOptions, say: Say,
                         agent: subprocess.Popen[bytes]) -> tuple[MigrationResult, dict[str, Any]]:
    """Run 'netpass agent' on the destination host and 'netpass migrate' on the
    source host, while the lab plays the management layer on the watch sockets."""
    import os

    assert lab.src_vm is not None and lab.dst_vm is not None
    token, agent_log = lab.rundir / "token", lab.rundir / "agent.log"
    client_token = token
    if opts.token_override is not None:
        client_token = lab.rundir / "client-token"
        client_token.write_bytes(opts.token_override)
        os.chmod(client_token, 0o600)
    report_path = lab.rundir / "report.json"
    res = MigrationResult()
    metrics_url = f"http://{MIG_DST}:{METRICS_PORT}/metrics"
    migrate_proc = None
    strangers: asyncio.subprocess.Process | None = None
    attack: dict[str, Any] | None = None
    try:
        if opts.metrics:
            res.metrics_before = await _curl(lab, metrics_url)
        async with Monitor(lab.src_vm.watch_qmp, "src-watch") as sw, \
                Monitor(lab.dst_vm.watch_qmp, "dst-watch") as dw:
            if opts.switchover_pause_ms > 0 or opts.on_pre_switchover != "continue":
                await sw.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "pause-before-switchover", "state": True}]})
            if opts.max_bandwidth_mib:
                await sw.execute("migrate-set-parameters", {"max-bandwidth": opts.max_bandwidth_mib << 20})
            manager = _Manager(lab, opts, res, sw, dw, say)
            watch = Watch()
            if opts.fault == "preauth-attack":
                strangers = await _start_strangers(lab, say)
            migrate_proc = await asyncio.create_subprocess_exec(
                *_cli(lab, "src", "-v", "migrate", "--qmp", lab.src_vm.qmp, "--uri", lab.migration_uri,
                      "--dest-agent", opts.agent_addr or f"{MIG_DST}:{AGENT_PORT}",
                      "--dest-qmp", lab.dst_vm.qmp,
                      "--token-file", str(client_token), "--report", str(report_path), "--json",
                      "--state-dir", str(lab.rundir / "src-state"),
                      *opts.migrate_args),
                env={**os.environ, **({} if opts.endgame else {"NETPASS_ENDGAME": "off"})},
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            communicate = asyncio.create_task(migrate_proc.communicate())
            lan = _LateLan(lab, opts.lan_lag_ms)
            faults = _Faults(lab, opts, say)
            faults.migrate = migrate_proc
            src_watch = True
            # With a fault, netpass may end before QEMU does: the lab, as the
            # management layer, sees the migration to its end (bounded).
            over_by = time.monotonic() + 120
            while not communicate.done() or not lan.done or \
                    (opts.fault and not await _migration_over(sw, lab) and time.monotonic() < over_by):
                if src_watch:
                    sev = await sw.next_event(0.003 if manager.active else 0.01)
                    await _on_src_event(sev, watch, lab, opts, res, sw, agent, say)
                    await faults.step(None if sev is None else
                                      sev.name + ":" + str(sev.data.get("status", "")), False)
                    await manager.step()
                    # Once the source QEMU is killed its watch socket is gone too.
                    src_watch = lab.src_vm.alive()
                await manager.resume_destination()
                ev = await dw.next_event(0.001 if src_watch else 0.01)
                if ev is not None and ev.name == "RESUME" and res.dst_resume_t is None:
                    res.dst_resume_t = ev.emitted
                await faults.step(None, res.dst_resume_t is not None)
                if (opts.kill_agent_after_resume_ms is not None and res.dst_resume_t is not None
                        and agent.poll() is None and time.monotonic() >=
                        res.dst_resume_t + opts.kill_agent_after_resume_ms / 1000):
                    say("lab: killing the destination agent after the resume")
                    agent.kill()
                    await asyncio.to_thread(agent.wait)
                lan.step(res.dst_resume_t, communicate.done())
            out, err = await communicate
            if opts.metrics:
                # The agent counts a session once it has closed it: wait for that.
                deadline = time.monotonic() + 5
                while True:
                    res.metrics_after = await _curl(lab, metrics_url)
                    if "netpass_sessions_total{" in res.metrics_after or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            if lab.src_vm.alive():
                try:
                    info = await sw.execute("query-migrate")
                    res.downtime_ms = info.get("downtime")
                    res.total_time_ms = info.get("total-time")
                except Exception:  # noqa: BLE001 - best effort figures for the lab
                    pass
    finally:
        if migrate_proc is not None and migrate_proc.returncode is None:
            migrate_proc.kill()
            await migrate_proc.wait()
        if strangers is not None:
            attack = await _end_strangers(strangers)
        await asyncio.to_thread(stop_agent, agent)
    res.dst_leftovers = await asyncio.to_thread(dst_leftovers, lab)
    res.src_leftovers = await asyncio.to_thread(src_leftovers, lab)
    keep = os.environ.get("NETPASS_LAB_KEEP_LOGS")
    if keep:
        import shutil

        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(agent_log, Path(keep) / f"{lab.run_id}-agent.log")
        for vm_log in list(lab.rundir.glob("*.log")) + list(lab.rundir.glob("*.console")):
            shutil.copy(vm_log, Path(keep) / f"{lab.run_id}-{vm_log.name}")
        (Path(keep) / f"{lab.run_id}-migrate.log").write_bytes(err)
    report: dict[str, Any] = {}
    if report_path.exists():
        report = json.loads(report_path.read_text())
    report["exit_code"] = migrate_proc.returncode if migrate_proc else None
    if attack is not None:
        report["attack"] = attack
    report["logs"] = {"migrate": err.decode(errors="replace")[-20000:],
                      "agent": agent_log.read_text(errors="replace")[-20000:]}
    if res.downtime_ms is None:
        res.downtime_ms = report.get("downtime_ms")
        res.total_time_ms = report.get("total_time_ms")
    say(f"netpass migrate exited {report['exit_code']}: captured {report.get('frames_captured')}, "
        f"replayed {report.get('frames_replayed')}")
    return res, report


async def _curl(lab: Lab, url: str) -> str:
    """What ``curl`` gets from ``url`` on the destination host."""
    proc = await asyncio.create_subprocess_exec(*netns.exec_argv(lab.ns("dst"), ["curl", "-sS", "-m", "5", url]),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise LabError(f"curl {url}: {err.decode(errors='replace').strip()}")
    return out.decode()


def dst_leftovers(lab: Lab, wait_s: float = 5.0) -> list[str]:
    """What a strict-ordering hold left on the destination host, if anything.

    A guard process undoes the hold of an agent that died; give it time.
    """
    from .. import hold, rps, tc

    def scan() -> list[str]:
        found: list[str] = []
        ns = lab.ns("dst")
        if links.exists(ns, "tap0"):
            found += [f"tap0 {q} steered to CPUs {m}" for q, m in rps.masks(ns, "tap0").items()
                      if rps.mask_cpus(m)]
            for q in tc.qdiscs(ns, "tap0"):
                if q.handle == hold.HANDLE or q.kind == "tbf":
                    found.append(f"qdisc {q.kind} {q.handle} on tap0 ({q.backlog_packets} held)")
            for direction in ("ingress", "egress"):
                if {hold.PREF, hold.PASS_PREF, hold.MIRROR_PREF} & tc.filter_prefs(ns, "tap0", direction):
                    found.append(f"{direction} filter on tap0")
        found += [f"link {n}" for n in links.names(ns)
                  if n.startswith((hold.IFB_PREFIX, hold.MIRROR_PREFIX))]
        state = lab.rundir / "state" / "holds"
        if state.is_dir():
            found += [f"state file {p.name}" for p in state.glob("*.json")]
        return found
    return _once_settled(scan, wait_s)


def src_leftovers(lab: Lab, wait_s: float = 5.0) -> list[str]:
    """What netpass left on the source host, if anything: its nft table,
    parking taps, pinned MACs, guard state files.  A guard undoes what a
    killed 'netpass migrate' left; give it time."""
    from .. import park

    ns = lab.ns("src")

    def scan() -> list[str]:
        found = [f"link {n}" for n in links.names(ns) if n.startswith(park.PREFIX)]
        tables = subprocess.run(netns.exec_argv(ns, ["nft", "list", "tables"]), capture_output=True,
                                text=True, timeout=10).stdout
        found += [f"nft {t.strip()}" for t in tables.splitlines() if "netpass_" in t]
        fdb = subprocess.run(netns.exec_argv(ns, ["bridge", "fdb", "show", "br", "br0"]), capture_output=True,
                             text=True, timeout=10).stdout
        found += [f"fdb {line.strip()}" for line in fdb.splitlines()
                  if line.startswith(GUEST_MAC) and "sticky" in line]
        state = lab.rundir / "src-state" / "sessions"
        if state.is_dir():
            found += [f"state file {p.name}" for p in state.glob("*.json")]
        return found
    return _once_settled(scan, wait_s)


def _once_settled(scan: Callable[[], list[str]], wait_s: float) -> list[str]:
    """``scan()`` again every 0.1 s until it finds nothing (a guard may
    still be undoing) or ``wait_s`` passed; what it found last."""
    deadline = time.monotonic() + wait_s
    while True:
        found = scan()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


async def _where(lab: Lab) -> tuple[str | None, str | None]:
    """Run state of the source and destination VMs (None once a QEMU is gone)."""
    out: list[str | None] = []
    for vm in (lab.src_vm, lab.dst_vm):
        if vm is None or not vm.alive():
            out.append(None)
            continue
        try:
            async with Monitor(vm.watch_qmp, f"{vm.name}-where") as mon:
                out.append(await mon.status())
        except Exception:  # noqa: BLE001 - a lab observation, not a netpass path
            out.append(None)
    return out[0], out[1]


def _await_fresh_counters(consoles: list[Path], timeout: float = 4.0) -> None:
    """Wait until every live guest printed its counters after the probing ended."""
    def count(console: Path) -> int:
        try:
            return _whole_lines(console).count("NETPASS-STAT")
        except OSError:
            return 0

    start = {console: count(console) for console in consoles}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(count(c) <= start[c] for c in consoles):
        time.sleep(0.05)


GUEST_FAULTS = ("Kernel panic", "BUG:", "Oops:", "general protection fault", "double fault",
                "is not a head!")


def guest_fault(console: Path) -> str | None:
    """The first line of a guest kernel crash or virtio ring error on this
    console, if any: a guest that died is not a network loss."""
    return guest_fault_line(guest_fault_trace(console, 1))


def guest_fault_line(trace: list[str]) -> str | None:
    """A crash trace's first line, as reports carry it."""
    return trace[0][:200] if trace else None


def guest_fault_trace(console: Path, lines: int = 40) -> list[str]:
    """A guest kernel crash on this console, from its first line on (up to
    ``lines``): where it was, for whoever looks into it."""
    try:
        text = console.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for i, line in enumerate(text):
        if any(f in line for f in GUEST_FAULTS):
            return [x.strip() for x in text[i:i + lines]]
    return []


def _whole_lines(console: Path) -> str:
    """A console's text up to its last newline: the guest may be writing the
    next line as we read (seen: a line cut short made a run's counters
    unreadable, failing a test with guest_in_echos null)."""
    text = console.read_text(errors="replace")
    return text[:text.rfind("\n") + 1]


def guest_counters(consoles: list[Path]) -> dict[str, int | None]:
    """The guest's own ICMP counters, from the last NETPASS-STAT line it printed.

    The counters live in the guest kernel and migrate with it, so the newest
    values are the largest seen on either console.  They say whether a probe
    reached the guest (InEchos) and whether the guest failed to send a reply
    itself (OutErrors), which the peer alone cannot tell apart from loss.
    """
    best: dict[str, int] = {}
    for console in consoles:
        try:
            lines = [ln for ln in _whole_lines(console).splitlines() if "NETPASS-STAT" in ln]
        except OSError:
            continue
        values: dict[str, int] = {}
        for line in reversed(lines):
            # The newest whole line: a kernel message can cut into one.
            try:
                icmp = line.split("Icmp:")[1].split()
                values = {"guest_in_echos": int(icmp[8]), "guest_icmp_out_msgs": int(icmp[14]),
                          "guest_icmp_out_errors": int(icmp[15])}
            except (IndexError, ValueError):
                continue
            try:
                # eth0's receive drops (/proc/net/dev: bytes, packets, errs, drop, ...):
                # a frame that reached the guest's NIC and that the guest dropped.
                values["guest_rx_dropped"] = int(line.split("eth0:")[1].split()[3])
            except (IndexError, ValueError):
                pass
            break
        for key, value in values.items():
            best[key] = max(best.get(key, 0), value)
    return {k: best.get(k) for k in ("guest_in_echos", "guest_icmp_out_msgs", "guest_icmp_out_errors",
                                     "guest_rx_dropped")}
