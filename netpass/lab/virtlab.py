"""The lab with libvirt in charge: the lab's hosts, a private libvirtd on the
source and the destination, the guest as a libvirt domain, and a migration
as an operator runs it: ``virsh migrate --live`` (the client talks to both
daemons; the migration stream goes over the lab's migration link).

Only plain libvirt for now: what a migration through libvirt loses, the
baseline for netpass's transparent mode (issue 16).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import LabError
from .image import READY_MARK, GuestImage
from .libvirtd import DOMAIN, Libvirtd, domain_xml
from .topology import GUEST_IP, GUEST_MAC, LAN_PREFIX, MIG_DST, MIG_PORT, PEER_IP, PEER_MAC, Lab

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
        out = self.dst.virsh("domjobinfo", DOMAIN, "--completed")
        info = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
        return info

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


def run_plain(image: GuestImage, rate: float, say: Say, warmup_s: float = 1.0, tail_s: float = 1.5,
              max_duration_s: float = 60.0) -> dict[str, Any]:
    """One plain ``virsh migrate --live`` under the peer's probes."""
    from .scenario import (
        ScenarioOptions,
        _await_fresh_counters,
        _prober_argv,
        guest_counters,
        guest_fault,
        wait_reachable,
    )

    opts = ScenarioOptions(mode="plain", rate=rate)
    with VirtLab(image) as vl:
        say(f"lab {vl.lab.run_id}: two libvirt daemons; booting the guest under TCG")
        boot = vl.start_guest()
        wait_reachable(vl.lab, opts)
        say(f"guest up after {boot:.1f} s; probing at {rate:.0f} pps")
        consoles = [vl.src.console, vl.dst.console]
        base = guest_counters(consoles)
        prober = subprocess.Popen(_prober_argv(vl.lab, opts, max_duration_s, None), stdin=subprocess.PIPE,
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

        _await_fresh_counters([vl.dst.console])
        stats: dict[str, Any] = json.loads(out)
        guest = guest_counters(consoles)
        for k, v in guest.items():
            b = base.get(k)
            stats[k] = v - b if v is not None and b is not None else None
        info = vl.job_info()
        stats.update(manager="libvirt", mode="plain", migrate_s=round(took, 2), job=info,
                     downtime_ms=downtime_ms(info), where=vl.where(), dst_guest_fault=guest_fault(vl.dst.console))
        return stats
