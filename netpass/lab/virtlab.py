"""The lab with libvirt in charge: the lab's hosts, a private libvirtd on the
source and the destination, the guest as a libvirt domain, and a migration
as an operator runs it: ``virsh migrate --live`` (the client talks to both
daemons; the migration stream goes over the lab's migration link).

Plain, it shows what a migration through libvirt loses; with ``agents``,
each host also runs ``netpass agent --libvirt`` (the transparent mode,
``follow.py``) and the run gathers the agents' reports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import netns
from ..errors import LabError
from .image import READY_MARK, GuestImage
from .libvirtd import DOMAIN, Libvirtd, domain_xml
from .topology import GUEST_IP, GUEST_MAC, LAN_PREFIX, MIG_DST, MIG_PORT, MIG_SRC, PEER_IP, PEER_MAC, Lab

Say = Callable[[str], None]


class VirtLab:
    """A :class:`Lab` whose source and destination hosts each run libvirtd."""

    def __init__(self, image: GuestImage) -> None:
        self.lab = Lab(image)
        self.src = Libvirtd("src", self.lab.ns("src"), self.lab.rundir / "libvirt-src")
        self.dst = Libvirtd("dst", self.lab.ns("dst"), self.lab.rundir / "libvirt-dst")
        self.uuid = str(uuid.uuid4())

    def __enter__(self) -> VirtLab:
        self.lab.__enter__()
        try:
            self.src.start()
            self.dst.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        errors = []
        for daemon in (self.src, self.dst):
            try:
                daemon.stop()
            except (OSError, LabError) as exc:
                errors.append(f"libvirtd {daemon.role}: {exc}")
        self.lab.destroy()
        if errors:
            raise LabError("libvirt lab cleanup incomplete: " + "; ".join(errors))

    def start_guest(self, boot_timeout: float = 180.0) -> float:
        """Create the guest on the source (a transient domain) and wait until
        it is up; return the seconds it took."""
        xml = self.lab.rundir / "domain.xml"
        xml.write_text(domain_xml(self.lab.image, self.uuid, GUEST_MAC, f"{GUEST_IP}/{LAN_PREFIX}",
                                  peer=f"{PEER_IP},{PEER_MAC}"))
        t0 = time.monotonic()
        self.src.virsh("create", str(xml))
        while READY_MARK not in _read(self.src.console):
            if DOMAIN not in self.src.virsh("list", "--name").split():
                raise LabError(f"the guest stopped while it booted: {_read(self.src.console)[-600:]}")
            if time.monotonic() - t0 > boot_timeout:
                raise LabError(f"guest not ready after {boot_timeout:.0f} s: {_read(self.src.console)[-600:]}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def migrate_argv(self, *extra: str) -> list[str]:
        """``virsh migrate --live`` as an operator types it."""
        return ["virsh", "-q", "-c", self.src.uri, "migrate", "--live", *extra, DOMAIN, self.dst.uri,
                "--migrateuri", f"tcp:{MIG_DST}:{MIG_PORT}"]

    def job_info(self) -> dict[str, str]:
        """``virsh domjobinfo --completed`` on the destination (the source's
        transient domain is gone with its migration), as a dict."""
        try:
            out = self.dst.virsh("domjobinfo", DOMAIN, "--completed")
        except LabError as exc:
            # (Seen once in a CI run, after a migration virsh called done:
            # say where the domain is and what libvirt and the guest said last.)
            qemu_log = _read(self.dst.qemu_log).strip().splitlines()[-8:]
            console = _read(self.dst.console).strip().splitlines()[-5:]
            raise LabError(f"{exc}; the domain's state: {self.where()}; the destination's QEMU log ends "
                           f"{qemu_log}; its console ends {console}") from exc
        info = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
        return info

    def taints(self) -> dict[str, list[str]]:
        """What libvirt's domain logs say it tainted the domain for, per host."""
        out = {}
        for daemon in (self.src, self.dst):
            out[daemon.role] = sorted(set(re.findall(r"Domain id=\d+ is tainted: (\S+)", _read(daemon.qemu_log))))
        return out

    def where(self) -> dict[str, str | None]:
        """The domain's state on each host (None: not there)."""
        out: dict[str, str | None] = {}
        for daemon in (self.src, self.dst):
            try:
                out[daemon.role] = daemon.virsh("domstate", DOMAIN).strip()
            except LabError:
                out[daemon.role] = None
        return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def downtime_ms(info: dict[str, str]) -> float | None:
    """QEMU's downtime as libvirt reports it ("Total downtime: 57 ms")."""
    m = re.match(r"(\d+)\s*ms", info.get("Total downtime", ""))
    return float(m.group(1)) if m else None


AGENT_PORT = 7411
MIG_ADDR = {"src": MIG_SRC, "dst": MIG_DST}


class Agents:
    """``netpass agent --libvirt`` on the lab's hosts (``roles``), each with
    the other as its peer, as the Ansible role would run them."""

    def __init__(self, vl: VirtLab, roles: tuple[str, ...], say: Say, kill_src_at: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        """``kill_src_at``: SIGKILL the source's agent once its log has this
        line; ``extra``: more arguments for every agent."""
        self.vl, self.roles, self.say, self.kill_src_at, self.extra = vl, roles, say, kill_src_at, extra
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed_at: float | None = None
        self._killer: threading.Thread | None = None

    def state_dir(self, role: str) -> Path:
        # (the names scenario.src_leftovers and dst_leftovers look under)
        return self.vl.lab.rundir / ("src-state" if role == "src" else "state")

    def log(self, role: str) -> Path:
        return self.vl.lab.rundir / f"agent-{role}.log"

    def __enter__(self) -> Agents:
        import secrets

        token = self.vl.lab.rundir / "token"
        token.write_text(secrets.token_hex(32))
        os.chmod(token, 0o600)
        try:
            for role in self.roles:
                other = "dst" if role == "src" else "src"
                daemon = self.vl.src if role == "src" else self.vl.dst
                argv = netns.exec_argv(self.vl.lab.ns(role), [
                    sys.executable, "-m", "netpass.cli", "-v", "agent",
                    "--listen", f"{MIG_ADDR[role]}:{AGENT_PORT}", "--token-file", str(token),
                    "--libvirt", daemon.uri, "--peer", f"{MIG_ADDR[other]}:{AGENT_PORT}",
                    "--state-dir", str(self.state_dir(role)), *self.extra])
                with open(self.log(role), "wb") as out:
                    self.procs[role] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            for role, proc in self.procs.items():
                deadline = time.monotonic() + 30
                while "agent listening" not in _read(self.log(role)):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise LabError(f"the {role} agent did not start: {_read(self.log(role))[-800:]}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.say("agents up in transparent mode on " + ", ".join(self.roles))
        if self.kill_src_at is not None and "src" in self.procs:
            self._killer = threading.Thread(target=self._kill_src, args=(self.kill_src_at,), daemon=True)
            self._killer.start()
        return self

    def _kill_src(self, line: str) -> None:
        proc = self.procs["src"]
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if line in _read(self.log("src")):
                proc.kill()
                self.killed_at = time.monotonic()
                self.say(f"lab: killed the source's agent at {line!r}")
                return
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        from .scenario import stop_agent

        for proc in self.procs.values():
            stop_agent(proc)

    def reports(self, role: str, wait_s: float) -> list[dict[str, Any]]:
        """The reports the ``role`` agent wrote, once it wrote one (within ``wait_s``)."""
        from ..follow import report_dir

        deadline = time.monotonic() + wait_s
        while True:
            paths = sorted(report_dir(self.state_dir(role)).glob("*.json"))
            if paths or time.monotonic() > deadline:
                return [json.loads(p.read_text()) for p in paths]
            time.sleep(0.1)


def run(image: GuestImage, rate: float, say: Say, agents: tuple[str, ...] = (), warmup_s: float = 1.0,
        tail_s: float = 1.5, max_duration_s: float = 60.0, proto: str = "icmp", tcp_rate_mbit: float = 20.0,
        frame_size: int = 98, timeline: Path | None = None, kill_src_agent_at: str | None = None,
        agent_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``virsh migrate --live`` under the peer's probes (or a TCP flow):
    plain, or with netpass's agents in transparent mode on the hosts in
    ``agents``."""
    from .scenario import (
        ScenarioOptions,
        _await_fresh_counters,
        _prober_argv,
        dst_leftovers,
        guest_counters,
        guest_fault,
        src_leftovers,
        wait_reachable,
    )

    opts = ScenarioOptions(mode="netpass" if agents else "plain", rate=rate, proto=proto,
                           tcp_rate_mbit=tcp_rate_mbit, frame_size=frame_size)
    with VirtLab(image) as vl:
        say(f"lab {vl.lab.run_id}: two libvirt daemons; booting the guest under TCG")
        boot = vl.start_guest()
        wait_reachable(vl.lab, opts)
        say(f"guest up after {boot:.1f} s; probing at {rate:.0f} pps")
        with Agents(vl, agents, say, kill_src_agent_at, agent_args) as ags:
            consoles = [vl.src.console, vl.dst.console]
            base = guest_counters(consoles)
            prober = subprocess.Popen(_prober_argv(vl.lab, opts, max_duration_s, timeline), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                time.sleep(warmup_s)
                say("migrating: " + " ".join(vl.migrate_argv()))
                t0 = time.monotonic()
                mig = subprocess.run(vl.migrate_argv(), capture_output=True, text=True, timeout=300)
                took = time.monotonic() - t0
                time.sleep(tail_s)
            finally:
                out, err = prober.communicate(timeout=60)
            if prober.returncode != 0:
                raise LabError(f"prober failed: {err.decode()[-500:]}")
            if mig.returncode != 0:
                raise LabError(f"virsh migrate failed: {mig.stderr.strip()}")
            reports = {role: ags.reports(role, 3 if ags.killed_at is not None else
                                         30 if role == "src" or "src" not in agents else 3)
                       for role in agents}
            killed = ags.killed_at is not None
            logs = {role: _read(ags.log(role))[-20000:] for role in agents}
        _await_fresh_counters([vl.dst.console])
        stats: dict[str, Any] = json.loads(out)
        guest = guest_counters(consoles)
        for k, v in guest.items():
            b = base.get(k)
            stats[k] = v - b if v is not None and b is not None else None
        info = vl.job_info()
        src_reports = reports.get("src") or [{}]
        elapsed = re.match(r"(\d+)", info.get("Time elapsed", ""))
        stats.update(manager="libvirt", mode=opts.mode, agents=list(agents), migrate_s=round(took, 2), job=info,
                     report=src_reports[-1], network_pause_ms=src_reports[-1].get("network_pause_ms"),
                     total_time_ms=int(elapsed.group(1)) if elapsed else None,
                     downtime_ms=downtime_ms(info), where=vl.where(), dst_guest_fault=guest_fault(vl.dst.console),
                     reports=reports, agent_logs=logs, taints=vl.taints(), src_agent_killed=killed,
                     src_leftovers=src_leftovers(vl.lab), dst_leftovers=dst_leftovers(vl.lab))
        return stats


def run_plain(image: GuestImage, rate: float, say: Say, **kw: Any) -> dict[str, Any]:
    """One plain ``virsh migrate --live`` under the peer's probes."""
    return run(image, rate, say, (), **kw)
