"""Receive packet steering: the only module that touches a device's
``queues/rx-*/rps_cpus`` and reads the per-CPU backlogs.

Why the strict hold needs it.  The VM's held transmissions leave the TX ifb
from a tasklet that hands each one to the host's receive path on whatever
CPU the tasklet ran.  Every veth or queueing hop after that puts the frame in
*that CPU's* backlog.  A released burst of a few hundred frames sits there
for a while, and meanwhile the VM's next frames run the tasklet on the other
CPU and go straight through: they overtake the tail of the burst.  Seen: a
lab CI run with 33 replies reordered (482 held); a throw-away rig with five
bridged veth hops and one busy core, 2 of 60 releases with 363 and 1,035
frames overtaken.  Pacing the release instead made it worse (7 of 60, a few
frames each): every small batch is another chance to change CPU.

With the tap's receive queues steered (RPS), every frame the host receives
from the tap, first from QEMU and again from the ifb, is queued in the
backlog of the CPU its flow hashes to, a FIFO, and processed there in order:
a flow keeps its order whichever CPU the tasklet ran on.  The CPUs are those
the agent may run on.  The steering is set while the destination VM does not
run yet (nothing in flight), and given back once those CPUs' backlogs have
been seen empty.

sysfs shows the devices of the network namespace it was mounted in, which
need not be this process's (a thread that entered a namespace with
``setns``); so each access runs in a private mount namespace with a sysfs of
its own, the way ``ip netns exec`` does.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from . import netns
from .errors import KernelError

log = logging.getLogger(__name__)

SOFTNET = Path("/proc/net/softnet_stat")
MAX_BACKLOG = Path("/proc/sys/net/core/netdev_max_backlog")
# A fresh mount point (a tmpfs over /tmp, in the private mount namespace):
# mounting over /sys fails where it already is this namespace's sysfs.
_MOUNT = ("mount -t tmpfs netpass-tmp /tmp && mkdir /tmp/sys && mount -t sysfs netpass-sysfs /tmp/sys "
          "|| exit 3; cd /tmp/sys/class/net/\"$1\"/queues || exit 4; ")
_READ = _MOUNT + 'for q in rx-*; do [ -e "$q/rps_cpus" ] && echo "$q $(cat "$q/rps_cpus")"; done; exit 0'
_WRITE = _MOUNT + 'shift; while [ $# -ge 2 ]; do echo "$2" > "$1/rps_cpus" || exit 5; shift 2; done'


def _sysfs(ns: str | None, script: str, dev: str, *args: str) -> str:
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "netpass-rps", dev, *args]
    try:
        proc = subprocess.run(netns.exec_argv(ns, argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"receive steering of {dev}: {exc}") from exc
    if proc.returncode == 4:
        raise KernelError(f"receive steering of {dev}: no such device")
    if proc.returncode:
        raise KernelError(f"receive steering of {dev}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def masks(ns: str | None, dev: str) -> dict[str, str]:
    """Each receive queue of ``dev`` and its CPU mask ({} without RPS in the kernel)."""
    out = {}
    for line in _sysfs(ns, _READ, dev).splitlines():
        queue, _, mask = line.partition(" ")
        if queue.startswith("rx-") and mask:
            out[queue] = mask.strip()
    return out


def set_masks(ns: str | None, dev: str, new: dict[str, str]) -> None:
    """Set the CPU mask of each named receive queue of ``dev``."""
    args = []
    for queue, mask in new.items():
        if not queue.startswith("rx-") or not queue[3:].isdigit():
            raise KernelError(f"receive steering of {dev}: {queue!r} is not a receive queue")
        if not all(c in "0123456789abcdefABCDEF," for c in mask) or not mask:
            raise KernelError(f"receive steering of {dev}: {mask!r} is not a CPU mask")
        args += [queue, mask]
    if args:
        _sysfs(ns, _WRITE, dev, *args)


def cpu_mask(cpus: Iterable[int]) -> str:
    """The sysfs mask of ``cpus`` (32-bit groups, highest first, comma-separated)."""
    value = 0
    for cpu in cpus:
        value |= 1 << cpu
    digits = f"{value:x}"
    digits = digits.rjust(-(-len(digits) // 8) * 8, "0")
    return ",".join(digits[i:i + 8] for i in range(0, len(digits), 8))


def mask_cpus(mask: str) -> set[int]:
    """The CPUs of a sysfs mask."""
    value = int(mask.replace(",", "") or "0", 16)
    return {cpu for cpu in range(value.bit_length()) if value >> cpu & 1}


def steering_cpus() -> list[int]:
    """The CPUs to steer to: those this process may run on (an agent kept
    to housekeeping CPUs keeps the VM's frames off the isolated ones)."""
    return sorted(os.sched_getaffinity(0))


def backlogs() -> dict[int, int]:
    """Frames waiting in each CPU's backlog now ({}: the kernel does not say)."""
    try:
        return parse_softnet(SOFTNET.read_text())
    except OSError:
        return {}


def parse_softnet(text: str) -> dict[int, int]:
    """CPU -> backlog length, from ``/proc/net/softnet_stat`` (one line per
    CPU, hex columns; the 12th is the backlog, the 13th the CPU, since 5.10)."""
    out = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 13:
            out[int(cols[12], 16)] = int(cols[11], 16)
    return out


def backlog_drops() -> int | None:
    """Frames the CPUs' input backlogs dropped so far, host-wide (over
    ``net.core.netdev_max_backlog``); None: the kernel does not say."""
    try:
        return parse_softnet_dropped(SOFTNET.read_text())
    except OSError:
        return None


def parse_softnet_dropped(text: str) -> int:
    """The sum of ``/proc/net/softnet_stat``'s second column (drops)."""
    return sum(int(cols[1], 16) for cols in (line.split() for line in text.splitlines()) if len(cols) >= 2)


def max_backlog() -> int:
    """``net.core.netdev_max_backlog``: a CPU's backlog drops what arrives
    past it (1,000 if it cannot be read)."""
    try:
        return max(1, int(MAX_BACKLOG.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return 1000


def wait_backlogs_empty(cpus: Iterable[int], bound_s: float) -> bool:
    """Wait up to ``bound_s`` until each of ``cpus`` has been seen with an
    empty backlog; True if all were."""
    return wait_backlogs_at_most(cpus, 0, bound_s)


def wait_backlogs_at_most(cpus: Iterable[int], frames: int, bound_s: float) -> bool:
    """Wait up to ``bound_s`` until each of ``cpus`` has been seen with at
    most ``frames`` in its backlog; True if all were (and when the kernel
    does not say)."""
    waiting = set(cpus)
    deadline = time.monotonic() + bound_s
    while True:
        now = backlogs()
        if not now:
            return True
        waiting = {c for c in waiting if now.get(c, 0) > frames}
        if not waiting:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
