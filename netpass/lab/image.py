"""Build the lab's guest image from Debian packages, once, into a cache.

The image is the Debian cloud kernel plus a busybox initramfs that loads the
virtio modules, configures ``eth0`` from the kernel command line and answers
ICMP (and UDP, with the kernel's port-unreachable reply, which quotes the
probe's payload).  Nothing binary is kept in the repository.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageBuildError, MissingDependency

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("NETPASS_CACHE", "/var/cache/netpass"))
KERNEL_META = "linux-image-cloud-amd64"
READY_MARK = "NETPASS-GUEST-READY"

# Modules needed for a virtio-net NIC on the PCI bus, in no particular order;
# load order is worked out from each module's own ``depends=`` field.
WANTED_MODULES = ("virtio_net", "virtio_pci")

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
# napi_tx=0: virtio-net releases a sent frame's socket memory when it hands
# it to the device, not when QEMU has sent it; under TCG the latter lags,
# and a burst of echo requests then exhausted the ICMP socket's send buffer
# (replies lost as OutErrors in the guest itself).
for m in $(cat /etc/modules.order); do
  if [ "$m" = virtio_net ]; then insmod /lib/modules/$m.ko napi_tx=0; else insmod /lib/modules/$m.ko; fi
done
sysctl -qw net.ipv4.icmp_ratelimit=0
sysctl -qw net.ipv4.icmp_msgs_per_sec=1000000
sysctl -qw net.ipv4.icmp_msgs_burst=1000000
sysctl -qw net.core.netdev_max_backlog=100000
IP=""
PEER=""
for w in $(cat /proc/cmdline); do
  case "$w" in
    netpass.ip=*) IP="${{w#netpass.ip=}}";;
    netpass.peer=*) PEER="${{w#netpass.peer=}}";;
  esac
done
ip link set lo up
ip link set eth0 up
ip link set eth0 txqueuelen 10000
[ -n "$IP" ] && ip addr add "$IP" dev eth0
# The lab's peer as a permanent neighbour: replies never wait on ARP.
[ -n "$PEER" ] && ip neigh replace "${{PEER%,*}}" lladdr "${{PEER#*,}}" dev eth0 nud permanent
# A TCP sink for the lab's bulk flow (tcpflow.py): one connection at a time.
(while true; do nc -l -p 5001 > /dev/null; done) &
echo "{READY_MARK} $(ip -o addr show dev eth0 | grep 'inet ')" > /dev/console
# Counters for the lab to read back: what the guest's own stack saw.
while true; do
  sleep 1
  echo "NETPASS-STAT $(grep eth0 /proc/net/dev | tr -s ' ') | $(grep 'Icmp:' /proc/net/snmp | tail -1)" > /dev/console
done
"""

Progress = Callable[[str], None]

@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path

    def exists(self) -> bool:
        return self.kernel.is_file() and self.initrd.is_file()

def _run(argv: list[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise MissingDependency(f"{argv[0]} is not installed; run scripts/setup or apt-get install it")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout

def _resolve_kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise ImageBuildError(f"cannot resolve {KERNEL_META}: run 'apt-get update' first")

def _module_depends(path: Path) -> list[str]:
    """Read ``depends=`` from a module's .modinfo strings."""
    data = path.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.index(b"\0", at + 1)
    value = data[at + len(b"\0depends="):end].decode()
    return [d for d in value.split(",") if d]

def _module_order(tree: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    index: dict[str, Path] = {}
    for ko in tree.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in index:
            return  # built into the kernel
        for dep in _module_depends(index[key]):
            visit(dep)
        order.append((key, index[key]))

    for name in wanted:
        visit(name)
    if not any(k == "virtio_net" for k, _ in order):
        log.info("virtio_net appears built in")
    return order

def image_paths(cache: Path = DEFAULT_CACHE) -> GuestImage:
    return GuestImage(kernel=cache / "guest" / "vmlinuz", initrd=cache / "guest" / "initrd.gz")

def build(cache: Path = DEFAULT_CACHE, progress: Progress | None = None, force: bool = False) -> GuestImage:
    """Build the guest image if it is not cached yet; return its paths."""
    say = progress or (lambda msg: log.info("%s", msg))
    image = image_paths(cache)
    stamp = cache / "guest" / "stamp"
    want_stamp = hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()
    if not force and image.exists() and stamp.is_file() and stamp.read_text() == want_stamp:
        return image
    (cache / "guest").mkdir(parents=True, exist_ok=True)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    kpkg = _resolve_kernel_package()
    for pkg in (kpkg, "busybox-static"):
        if not list(debs.glob(f"{pkg}_*.deb")):
            say(f"downloading {pkg}")
            _run(["apt-get", "download", pkg], cwd=debs)
    with tempfile.TemporaryDirectory(prefix="netpass-image-") as tmp:
        work = Path(tmp)
        say("unpacking the kernel and busybox")
        for pkg in (kpkg, "busybox-static"):
            deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
            _run(["dpkg-deb", "-x", str(deb), str(work / "x")])
        kernels = sorted((work / "x" / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageBuildError(f"{kpkg} holds no /boot/vmlinuz-*")
        root = work / "root"
        for sub in ("bin", "etc", "lib/modules", "proc", "sys", "dev", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "x" / "bin" / "busybox", root / "bin" / "busybox")
        mod_trees = list((work / "x" / "lib" / "modules").glob("*"))
        if not mod_trees:
            raise ImageBuildError(f"{kpkg} holds no modules")
        order = _module_order(mod_trees[0], WANTED_MODULES)
        for name, path in order:
            shutil.copy2(path, root / "lib" / "modules" / f"{name}.ko")
        (root / "etc" / "modules.order").write_text("\n".join(n for n, _ in order) + "\n")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        say("packing the initramfs")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                              input="\n".join(files).encode(), capture_output=True)
        if cpio.returncode != 0:
            raise ImageBuildError(f"cpio failed: {cpio.stderr.decode()[-300:]}")

        tmp_initrd = image.initrd.with_suffix(".tmp")
        with gzip.open(tmp_initrd, "wb", compresslevel=6) as fh:
            fh.write(cpio.stdout)
        shutil.copy2(kernels[-1], image.kernel)
        os.replace(tmp_initrd, image.initrd)
    stamp.write_text(want_stamp)
    say(f"guest image ready in {image.kernel.parent}")
    return image
