"""QEMU processes of the lab, started inside a namespace and ended by pid."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import netns
from ..errors import LabError, MissingDependency
from .image import READY_MARK, GuestImage

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: if the lab process dies without cleaning up, its QEMUs
    go with it.  The parent may die between fork and prctl, which then never
    fires (the killed-lab test hit that once): so check it is still there."""
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


@dataclass
class VM:
    """One lab QEMU.  ``qmp`` is the tool's socket, ``watch_qmp`` a spare one."""

    name: str
    ns: str
    rundir: Path
    image: GuestImage
    mac: str
    ip_cidr: str
    tap: str = "tap0"
    memory_mib: int = 256
    incoming: str | None = None
    peer: str | None = None
    queues: int = 1  # tap queues and virtio-net queue pairs (and vCPUs, so the guest uses them all)
    guest_name: str = "netpass-lab-guest"  # QEMU's -name: the same guest on both hosts
    uuid: str | None = None  # QEMU's -uuid: likewise
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def qmp(self) -> str:
        return str(self.rundir / f"{self.name}.qmp")

    @property
    def watch_qmp(self) -> str:
        return str(self.rundir / f"{self.name}-watch.qmp")

    @property
    def console(self) -> Path:
        return self.rundir / f"{self.name}.console"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        argv = [
            QEMU, "-name", self.guest_name, *(("-uuid", self.uuid) if self.uuid else ()),
            "-machine", "pc,accel=tcg", "-cpu", "qemu64",
            "-m", str(self.memory_mib), "-smp", str(self.queues), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console}",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", f"console=ttyS0 panic=-1 quiet netpass.ip={self.ip_cidr}"
                       + (f" netpass.peer={self.peer}" if self.peer else ""),
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no,vhost=off"
                       + (f",queues={self.queues}" if self.queues > 1 else ""),
            "-device", f"virtio-net-pci,netdev=n0,mac={self.mac},romfile="
                       + (f",mq=on,vectors={2 * self.queues + 2}" if self.queues > 1 else ""),
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-qmp", f"unix:{self.watch_qmp},server=on,wait=off",
        ]
        if self.incoming:
            argv += ["-incoming", self.incoming]
        else:
            argv += ["-S"]  # start paused: the lab plugs the tap in, then continues
        return argv

    def start(self) -> None:
        if shutil.which(QEMU) is None:
            raise MissingDependency(f"{QEMU} is not installed: apt-get install qemu-system-x86")
        log_path = self.rundir / f"{self.name}.log"
        with open(log_path, "wb") as err:
            self.proc = subprocess.Popen(netns.exec_argv(self.ns, self.argv()),
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         preexec_fn=_die_with(os.getpid()))
        deadline = time.monotonic() + 30
        while not os.path.exists(self.qmp):
            if self.proc.poll() is not None:
                raise LabError(f"QEMU {self.name} exited at start: {log_path.read_text()[-800:]}")
            if time.monotonic() > deadline:
                raise LabError(f"QEMU {self.name} did not open its QMP socket within 30 s")
            time.sleep(0.02)
        log.info("started QEMU %s pid %d in %s", self.name, self.proc.pid, self.ns)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Wait for the guest's ready line on the console; return seconds taken."""
        t0 = time.monotonic()
        while True:
            try:
                if READY_MARK in self.console.read_text(errors="replace"):
                    return time.monotonic() - t0
            except FileNotFoundError:
                pass
            if not self.alive():
                raise LabError(f"QEMU {self.name} exited while the guest booted")
            if time.monotonic() - t0 > timeout:
                tail = self.console.read_text(errors="replace")[-600:] if self.console.exists() else ""
                raise LabError(f"guest {self.name} not ready after {timeout:.0f} s; console: {tail}")
            time.sleep(0.1)

    def kill(self, timeout: float = 5.0) -> None:
        """End this QEMU by its pid: SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        log.info("ended QEMU %s pid %d", self.name, self.proc.pid)
