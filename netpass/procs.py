"""Whether a process still runs, from /proc: the one place that asks."""

from __future__ import annotations

import os
import time


def alive(pid: int, settle_s: float = 0.0) -> bool:
    """Whether process ``pid`` runs; a zombie counts as gone.  A process
    still running is given ``settle_s`` seconds to go (one being killed)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.02)


def qemu_by_uuid(uuid: str) -> int | None:
    """The pid of the QEMU process started with ``-uuid UUID`` (as libvirt
    starts every domain's) in this network namespace, or None.  Used where
    netpass reaches QEMU through libvirt and has no QMP socket of its own
    to ask for the peer's pid.  (A migration's two QEMUs share the UUID;
    where both run on one machine, as in the lab, each host is a network
    namespace.)"""
    want = uuid.lower()
    try:
        here = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        here = None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu" not in os.path.basename(argv[0]):
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-uuid" and argv[i + 1].decode(errors="replace").lower() == want:
                try:
                    same_net = here is None or os.stat(f"/proc/{entry.name}/ns/net").st_ino == here
                except OSError:
                    same_net = False
                if same_net and alive(int(entry.name)):
                    return int(entry.name)
    return None
