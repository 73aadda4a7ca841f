"""A private libvirt daemon per lab host: the lab's way to migrate as libvirt does.

Each lab host runs Debian's own ``libvirtd`` inside its network namespace
and a mount namespace of its own, so two daemons on one machine act as two
hosts and leave the machine's libvirt (if any) alone:

* ``/etc/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and
  ``/var/cache/libvirt`` are bind mounts of directories under the lab's run
  directory, and ``/run/libvirt`` is a private tmpfs.  The mount points are
  libvirt's usual directories; ``scripts/setup`` creates them empty.
* The daemon's sockets live in the run directory (``unix_sock_dir``), where
  the lab, virsh and netpass reach them from outside.
* There is no systemd, machined or virtlogd: ``qemu.conf`` runs QEMU as root
  (``user``/``group``), without cgroups or namespaces of libvirt's own, without
  a security driver, and writes QEMU's stdio to a file (``stdio_handler``).
  libvirt's QEMU driver resolves its built-in user ``libvirt-qemu`` before it
  reads ``qemu.conf``: ``scripts/setup`` creates that system user.

The guest's serial console is ``/var/log/libvirt/netpass-console.log`` in its
domain XML: the same path on both hosts, which each host's mount namespace
maps to its own file (:attr:`Libvirtd.console`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from .. import netns
from ..errors import LabError, MissingDependency
from .image import GuestImage
from .vm import _die_with

log = logging.getLogger(__name__)

LIBVIRTD = "/usr/sbin/libvirtd"
VIRSH = "virsh"
DOMAIN = "netpass-lab-guest"
GUEST_CONSOLE = "/var/log/libvirt/netpass-console.log"
PRIVATE_DIRS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
                "cache": "/var/cache/libvirt"}

QEMU_CONF = """\
# netpass lab: no systemd, machined or virtlogd on the host.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
"""


def _libvirtd_conf(sock_dir: Path, log_file: Path) -> str:
    return f"""\
unix_sock_dir = "{sock_dir}"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:{log_file}"
"""


def domain_xml(image: GuestImage, uuid: str, mac: str, ip_cidr: str, peer: str | None = None,
               memory_mib: int = 256, tap: str = "tap0", bridge: str = "br0") -> str:
    """The lab guest as a libvirt domain: TCG, the lab's kernel and initrd
    booted directly, one virtio NIC on the host's bridge (a tap libvirt
    makes, named ``tap``; QEMU's own virtio backend, no vhost)."""
    cmdline = f"console=ttyS0 panic=-1 quiet netpass.ip={ip_cidr}" + (f" netpass.peer={peer}" if peer else "")
    return f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <uuid>{escape(uuid)}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='bridge'>
      <source bridge='{escape(bridge)}'/>
      <target dev='{escape(tap)}'/>
      <mac address='{escape(mac)}'/>
      <model type='virtio'/>
      <driver name='qemu'/>
      <rom enabled='no'/>
    </interface>
    <serial type='file'><source path='{GUEST_CONSOLE}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class Libvirtd:
    """One host's daemon.  ``root`` is its own directory in the lab's run
    directory; everything it writes lives there."""

    role: str
    ns: str
    root: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def console(self) -> Path:
        """The guest's serial console on this host, as the lab sees it."""
        return self.root / "log" / Path(GUEST_CONSOLE).name

    @property
    def log_file(self) -> Path:
        return self.root / "libvirtd.log"

    @property
    def qemu_log(self) -> Path:
        """libvirt's log of the lab domain's QEMU on this host."""
        return self.root / "log" / "qemu" / f"{DOMAIN}.log"

    def _script(self) -> str:
        mounts = ["mount -t tmpfs -o mode=0755 netpass-libvirt /run/libvirt"]
        mounts += [f"mount --bind '{self.root / key}' '{path}'" for key, path in PRIVATE_DIRS.items()]
        return " && ".join(mounts) + (f" && exec {LIBVIRTD} -f '{self.root / 'etc' / 'libvirtd.conf'}'"
                                      f" -p '{self.root / 'libvirtd.pid'}'")

    def start(self, timeout: float = 30.0) -> None:
        for tool in (LIBVIRTD, "unshare"):
            if shutil.which(tool) is None:
                raise MissingDependency(f"{tool} is not installed: run scripts/setup "
                                        "(apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)")
        missing = [p for p in ("/run/libvirt", *PRIVATE_DIRS.values()) if not os.path.isdir(p)]
        if missing:
            raise MissingDependency(f"libvirt's directories {', '.join(missing)} are missing: run scripts/setup")
        for key in (*PRIVATE_DIRS, "sock"):
            (self.root / key).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(_libvirtd_conf(self.socket.parent, self.log_file))
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        out = open(self.root / "libvirtd.out", "wb")
        with out:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", self._script()]
            self.proc = subprocess.Popen(netns.exec_argv(self.ns, argv), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, start_new_session=True,
                                         preexec_fn=_die_with(os.getpid()))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"libvirtd ({self.role}) exited at start: "
                               f"{(self.root / 'libvirtd.out').read_text(errors='replace')[-800:]}")
            if self.socket.exists():
                try:
                    self.virsh("version", timeout=10)
                    break
                except LabError:
                    pass
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd ({self.role}) did not answer within {timeout:.0f} s")
            time.sleep(0.05)
        log.info("libvirtd %s pid %d in %s", self.role, self.proc.pid, self.ns)

    def virsh(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``virsh -c URI args``; its output, or LabError with virsh's message."""
        argv = [VIRSH, "-q", "-c", self.uri, *args]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"virsh {' '.join(args)} ({self.role}) took over {timeout:.0f} s") from exc
        if res.returncode != 0:
            raise LabError(f"virsh {' '.join(args)} ({self.role}): {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def stop(self, timeout: float = 10.0) -> None:
        """Destroy its domains and end the daemon, by its pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for name in self.virsh("list", "--name", timeout=10).split():
                try:
                    self.virsh("destroy", name, timeout=20)
                except LabError as exc:
                    log.warning("%s", exc)
        except LabError as exc:
            log.warning("%s", exc)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)
        log.info("ended libvirtd %s pid %d", self.role, self.proc.pid)
