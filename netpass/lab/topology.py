"""The lab's hosts: namespaces, bridges, veths and the two QEMUs.

::

    peer(eth0 198.18.0.1) ── lan0 bridge ──┬── up0 ─ br0(src) ─ tap0 ─ VM (198.18.0.10)
                                           └── up0 ─ br0(dst) ─ tap0 ─ VM (-incoming)
    src mig0 198.19.0.1/30 ───────── dst mig0 198.19.0.2/30   (migration link)

Every name carries the run id; everything is removed on every exit path.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .. import links, netns, procs
from ..errors import LabError
from .image import GuestImage
from .vm import VM

log = logging.getLogger(__name__)

PREFIX = "nplab"
RUN_ROOT = Path("/run/netpass-lab")
PEER_IP = "198.18.0.1"
GUEST_IP = "198.18.0.10"
LAN_PREFIX = 24
MIG_SRC = "198.19.0.1"
MIG_DST = "198.19.0.2"
MIG_PORT = 4444
GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = "02:6e:70:00:00:01"
ROLES = ("lan", "src", "dst", "peer")


@dataclass
class Lab:
    image: GuestImage
    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(2)}")
    src_vm: VM | None = None
    dst_vm: VM | None = None
    created: list[str] = field(default_factory=list)
    owner_pid: int = field(default_factory=os.getpid)

    def ns(self, role: str) -> str:
        return f"{PREFIX}-{self.run_id}-{role}"

    @property
    def rundir(self) -> Path:
        return RUN_ROOT / self.run_id

    @property
    def migration_uri(self) -> str:
        return f"tcp:{MIG_DST}:{MIG_PORT}"

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def build(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        for role in ROLES:
            name = self.ns(role)
            netns.create(name)
            self.created.append(name)
            links.set_up(name, "lo")
        lan, src, dst, peer = (self.ns(r) for r in ROLES)
        links.add_bridge(lan, "lan0")
        for role, host in (("src", src), ("dst", dst)):
            links.add_veth(lan, f"p-{role}", host, "up0")
            links.enslave(lan, f"p-{role}", "lan0")
            links.add_bridge(host, "br0")
            links.enslave(host, "up0", "br0")
        links.add_veth(lan, "p-peer", peer, "eth0")
        links.set_mac(peer, "eth0", PEER_MAC)
        links.enslave(lan, "p-peer", "lan0")
        links.add_address(peer, "eth0", PEER_IP, LAN_PREFIX)
        links.add_veth(src, "mig0", dst, "mig0")
        links.add_address(src, "mig0", MIG_SRC, 30)
        links.add_address(dst, "mig0", MIG_DST, 30)
        log.info("lab %s built", self.run_id)

    def start_vms(self, boot_timeout: float = 180.0, queues: int = 1) -> float:
        """Start the source guest and the waiting destination; return boot seconds."""
        guest_uuid = str(uuid.uuid4())
        self.src_vm = VM("src", self.ns("src"), self.rundir, self.image, GUEST_MAC,
                         f"{GUEST_IP}/{LAN_PREFIX}", peer=f"{PEER_IP},{PEER_MAC}", queues=queues,
                         uuid=guest_uuid)
        self.src_vm.start()
        links.wait_for(self.ns("src"), "tap0", 10)
        links.enslave(self.ns("src"), "tap0", "br0")
        self.dst_vm = VM("dst", self.ns("dst"), self.rundir, self.image, GUEST_MAC,
                         f"{GUEST_IP}/{LAN_PREFIX}", incoming=f"tcp:{MIG_DST}:{MIG_PORT}",
                         peer=f"{PEER_IP},{PEER_MAC}", queues=queues, uuid=guest_uuid)
        self.dst_vm.start()
        links.wait_for(self.ns("dst"), "tap0", 10)
        links.enslave(self.ns("dst"), "tap0", "br0")
        return 0.0

    def destroy(self) -> None:
        """Remove every process, namespace and file of this run."""
        if os.getpid() != self.owner_pid:
            return  # a forked helper unwinding: the owner cleans up
        errors: list[str] = []
        for vm in (self.src_vm, self.dst_vm):
            if vm is not None:
                try:
                    vm.kill()
                except OSError as exc:
                    errors.append(f"{vm.name}: {exc}")
        for name in reversed(self.created):
            # Anything still running in our own namespaces was started by us.
            for pid in netns.pids_in(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                netns.remove(name)
            except Exception as exc:  # keep going: remove the rest
                errors.append(f"{name}: {exc}")
        self.created.clear()
        shutil.rmtree(self.rundir, ignore_errors=True)
        if errors:
            raise LabError("lab cleanup incomplete: " + "; ".join(errors))


def leftovers() -> list[str]:
    """Lab namespaces that exist now, from any run."""
    return [n for n in netns.list_names() if n.startswith(PREFIX + "-")]


DEMO_TMP = "netpass-demo-"


def demo_tmp_prefix() -> str:
    """The prefix of this process's temporary directory for a demo: with its
    pid, so that a sweep can tell one whose demo was killed."""
    return f"{DEMO_TMP}{os.getpid()}-"


def _sweep_demo_dirs() -> list[str]:
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{DEMO_TMP}*-*"):
        try:
            owner = int(path.name[len(DEMO_TMP):].split("-")[0])
        except ValueError:
            continue
        if path.is_dir() and not procs.alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def sweep_stale() -> list[str]:
    """Remove lab namespaces, and demo directories, whose owning lab process is gone."""
    removed: list[str] = _sweep_demo_dirs()
    for name in leftovers():
        try:
            owner = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if procs.alive(owner):
            continue
        for pid in netns.pids_in(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        netns.remove(name)
        removed.append(name)
        shutil.rmtree(RUN_ROOT / "-".join(name.split("-")[1:3]), ignore_errors=True)
    return removed
