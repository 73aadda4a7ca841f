"""Tap file descriptors: /dev/net/tun, fdinfo, pidfd_getfd(2) and the
tap's queue steering (TUNSETSTEERINGEBPF).

The only module that opens taps or takes fds from another process.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import re
import struct
from dataclasses import dataclass

from .errors import KernelError, PermissionProblem

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
# What a tap may be handed without the kernel segmenting it first: checksum
# offload, TSO for v4 and v6 and ECN (linux/if_tun.h TUN_F_*).
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUNGETVNETHDRSZ = 0x800454D7
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1

_libc = ctypes.CDLL(None, use_errno=True)


def open_tap(name: str, vnet_hdr: bool = False, multi_queue: bool = False) -> int:
    """Create (or attach to) tap ``name`` in the caller's namespace; return the fd.
    With ``multi_queue`` each call attaches one more queue."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise KernelError(f"cannot open tap {name}: {exc}") from exc
    return fd


def accept_offloads(fd: int) -> None:
    """Let the tap take checksum-offloaded and GSO frames as they are (what
    QEMU asks for a virtio-net guest), so frames steered into it keep their
    offload metadata in the virtio-net header instead of being segmented."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except OSError as exc:
        raise KernelError(f"cannot set a tap's offloads: {exc}") from exc


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate ``target_fd`` of the process behind ``pidfd`` into ours."""
    fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (1, 13):  # EPERM, EACCES
            raise PermissionProblem(
                f"pidfd_getfd refused ({os.strerror(err)}): netpass needs CAP_SYS_PTRACE and "
                "ptrace rights over QEMU (check kernel.yama.ptrace_scope and the QEMU sandbox)")
        raise KernelError(f"pidfd_getfd failed: {os.strerror(err)}")
    return int(fd)


@dataclass(frozen=True)
class TapFd:
    pid: int
    fd: int
    ifname: str


_IFF_RE = re.compile(r"^iff:\s*(\S+)", re.M)


def tap_fds_of(pid: int) -> list[TapFd]:
    """Every tun/tap fd that process ``pid`` holds, from /proc/PID/fdinfo."""
    out: list[TapFd] = []
    base = f"/proc/{pid}/fd"
    try:
        entries = os.listdir(base)
    except OSError as exc:
        raise KernelError(f"cannot list fds of pid {pid}: {exc}") from exc
    for entry in entries:
        try:
            if os.readlink(f"{base}/{entry}") != "/dev/net/tun":
                continue
            with open(f"/proc/{pid}/fdinfo/{entry}") as fh:
                m = _IFF_RE.search(fh.read())
        except OSError:
            continue
        if m:
            out.append(TapFd(pid=pid, fd=int(entry), ifname=m.group(1)))
    return sorted(out, key=lambda t: t.fd)


def vnet_hdr_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, TUNGETVNETHDRSZ, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def readable(fds: list[int]) -> bool:
    """Whether any of these tap fds has a frame waiting in its ring.

    tun reports POLLIN exactly when its ring is not empty, so this looks at
    the ring without taking anything from it.
    """
    return Watch(fds).readable()


class Watch:
    """:func:`readable` for the same fds again and again, with one poll
    object made once."""

    def __init__(self, fds: list[int]) -> None:
        import select

        self._poller = select.poll()
        for fd in fds:
            self._poller.register(fd, select.POLLIN)

    def readable(self) -> bool:
        return bool(self._poller.poll(0))


def drain(fd: int, limit: int, bufsize: int = 65_600) -> list[bytes]:
    """Up to ``limit`` frames from a non-blocking tap fd, in ring order; fewer
    once the ring is empty.  The tight loop is the whole cost of capture:
    tun has no batched read, so this is one read(2) per frame."""
    out: list[bytes] = []
    append, read = out.append, os.read
    try:
        for _ in range(limit):
            append(read(fd, bufsize))
    except BlockingIOError:
        pass
    return out


def is_nonblocking(fd: int) -> bool:
    """Report whether the fd is non-blocking; QEMU opens taps that way.

    The flag lives on the open file description, which is shared with QEMU,
    so netpass never changes it: it only refuses to read a blocking one.
    """
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def _queue_program(queue: int) -> int:
    """A two-instruction eBPF program that answers ``queue``: its fd."""
    if SYS_BPF is None:
        raise KernelError(f"no bpf(2) number known for {os.uname().machine}")
    # r0 = queue; exit  (BPF_ALU64|BPF_MOV|BPF_K, then BPF_JMP|BPF_EXIT)
    insns = struct.pack("<BBhi", 0xB7, 0, 0, queue) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
    # log_level, log_size, log_buf, kern_version (the rest zero).
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIQQIIQI", BPF_PROG_TYPE_SOCKET_FILTER, 2, ctypes.addressof(ibuf), ctypes.addressof(lic),
        0, 0, 0, 0), 48)
    fd = _libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, 48)
    if fd < 0:
        err = ctypes.get_errno()
        raise KernelError(f"cannot load a queue steering program: {os.strerror(err)}")
    return int(fd)


def steer_to_queue(fd: int, queue: int) -> None:
    """Every frame toward the tap's reader goes to ``queue`` (the tap of
    ``fd``, all its queues): in place of tun's automatic choice, which
    follows each flow to the queue its reader last sent it on."""
    prog = _queue_program(queue)
    try:
        fcntl.ioctl(fd, TUNSETSTEERINGEBPF, struct.pack("i", prog))
    except OSError as exc:
        raise KernelError(f"cannot set the tap's queue steering: {exc.strerror}") from exc
    finally:
        os.close(prog)  # the tap holds its own reference


def steer_automatically(fd: int) -> None:
    """Back to tun's automatic queue choice (no steering program)."""
    try:
        fcntl.ioctl(fd, TUNSETSTEERINGEBPF, struct.pack("i", -1))
    except OSError as exc:
        raise KernelError(f"cannot reset the tap's queue steering: {exc.strerror}") from exc
