"""Find a VM's virtio NICs, their MACs and the taps behind them.

QEMU's pid comes from the QMP socket's peer credentials; its tap fds from
/proc/PID/fdinfo (``iff:``); the NIC-to-tap pairing from ``info network``,
which names the tap by ``ifname=`` or, for fds passed in by a management
layer, by ``fd=``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from . import tapfd
from .errors import NetpassError, QMPError
from .qmp import QMP

log = logging.getLogger(__name__)


class DiscoveryError(NetpassError):
    """The VM's NICs or taps could not be identified."""


@dataclass
class Nic:
    mac: str
    tap: str
    name: str = "?"
    model: str = "?"
    netdev: str = "?"
    qemu_fds: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"mac": self.mac, "tap": self.tap, "model": self.model, "queues": len(self.qemu_fds)}


_NIC_RE = re.compile(r"^(?P<name>\S+): index=\d+,type=nic,model=(?P<model>[^,]+),macaddr=(?P<mac>[0-9a-f:]{17})", re.I)
_PEER_RE = re.compile(r"^\s*\\\s*(?P<id>[^:]+): index=\d+,type=(?P<type>[^,]+)(?P<rest>.*)$")


def parse_info_network(text: str) -> list[tuple[str, str, str, str, str, str]]:
    """(NIC name, model, mac, netdev id, netdev type, options) per NIC from ``info network``."""
    out = []
    current: tuple[str, str, str] | None = None
    for line in text.splitlines():
        m = _NIC_RE.match(line.strip())
        if m:
            current = (m["name"], m["model"], m["mac"].lower())
            continue
        p = _PEER_RE.match(line)
        if p and current is not None:
            out.append((*current, p["id"].strip(), p["type"], p["rest"]))
            current = None
    return out


async def discover(mon: QMP, pid: int) -> list[Nic]:
    from .virt import DomainMonitor

    if isinstance(mon, DomainMonitor):  # (libvirt's XML names the taps, and needs no QMP job)
        return from_interfaces(await mon.interfaces(), pid)
    text = await mon.execute("human-monitor-command", {"command-line": "info network"})
    fds = tapfd.tap_fds_of(pid)
    by_fd = {t.fd: t.ifname for t in fds}
    nics: list[Nic] = []
    for name, model, mac, netdev, ntype, rest in parse_info_network(str(text)):
        if ntype != "tap":
            log.info("NIC %s uses a %s backend: not a tap, netpass cannot cover it", mac, ntype)
            continue
        opts = dict(kv.split("=", 1) for kv in rest.strip(",").split(",") if "=" in kv)
        ifname = opts.get("ifname")
        if ifname is None and opts.get("fd", "").isdigit():
            ifname = by_fd.get(int(opts["fd"]))
        if ifname is None:
            raise DiscoveryError(f"cannot tell which tap NIC {mac} uses (info network says {rest!r})")
        queue_fds = [t.fd for t in fds if t.ifname == ifname]
        if not queue_fds:
            raise DiscoveryError(f"QEMU pid {pid} holds no fd for tap {ifname} of NIC {mac}")
        nics.append(Nic(mac=mac, tap=ifname, name=name, model=model, netdev=netdev, qemu_fds=queue_fds))
    if not nics:
        raise DiscoveryError(f"QEMU pid {pid} has no NIC on a tap backend: nothing for netpass to do")
    return nics


def from_interfaces(interfaces: list[tuple[str, str, str]], pid: int) -> list[Nic]:
    """The NICs a management layer describes as (MAC, tap, model), with the
    tap fds QEMU ``pid`` holds (libvirt's domain XML names each NIC's tap)."""
    fds = tapfd.tap_fds_of(pid)
    nics = []
    for mac, tap, model in interfaces:
        queue_fds = [t.fd for t in fds if t.ifname == tap]
        if not queue_fds:
            log.info("NIC %s: QEMU pid %d holds no fd for its tap %s: not covered", mac, pid, tap)
            continue
        nics.append(Nic(mac=mac, tap=tap, model=model, qemu_fds=queue_fds))
    if not nics:
        raise DiscoveryError(f"QEMU pid {pid} has no NIC on a tap it holds: nothing for netpass to do")
    return nics


async def virtio_paths(mon: QMP) -> dict[str, str]:
    """MAC -> QOM path of each virtio-net device, or {} when this QEMU lacks
    the (experimental) virtio introspection commands."""

    try:
        devices = await mon.execute("x-query-virtio")
    except QMPError:
        return {}
    out: dict[str, str] = {}
    for dev in devices:
        if dev.get("name") != "virtio-net":
            continue
        try:
            mac = await mon.execute("qom-get", {"path": dev["path"], "property": "mac"})
        except QMPError:
            continue
        out[str(mac).lower()] = str(dev["path"])
    return out


async def rss_in_use(mon: QMP, mac: str) -> bool | None:
    """Whether QEMU may steer this NIC's queues with its own eBPF program
    (virtio-net ``rss=on``): None when this QEMU cannot say (no virtio
    introspection).  Uses an experimental command: only while the VM is
    not running."""

    path = (await virtio_paths(mon)).get(mac.lower())
    if path is None:
        return None
    try:
        return bool(await mon.execute("qom-get", {"path": path, "property": "rss"}))
    except QMPError:
        return False  # a QEMU without RSS support


async def virtio_backend(mon: QMP, mac: str) -> str | None:
    """QOM path of the virtio device behind the NIC with ``mac`` (what the
    virtio queue queries take), found with stable QOM commands only, so it
    can be asked while the VM runs; None if it is not a virtio-net NIC
    plugged as a device QEMU lists under ``/machine/peripheral*``."""

    for base in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = await mon.execute("qom-list", {"path": base})
        except QMPError:
            continue
        for child in children:
            kind = str(child.get("type", ""))
            if not kind.startswith("child<virtio-net"):
                continue
            path = f"{base}/{child['name']}"
            try:
                if str(await mon.execute("qom-get", {"path": path, "property": "mac"})).lower() != mac.lower():
                    continue
            except QMPError:
                continue
            return path if kind == "child<virtio-net-device>" else f"{path}/virtio-backend"
    return None


async def rx_without_buffer(mon: QMP, path: str, queue: int) -> bool:
    """Whether the guest had no free RX buffer on ``queue``: QEMU then held
    the frame it last read for the guest, and purged it when the VM stopped.
    Reads the guest's available index from guest memory
    (``x-query-virtio-queue-element``, experimental): only with the VM
    stopped."""
    el = await mon.execute("x-query-virtio-queue-element", {"path": path, "queue": 2 * queue})
    return (int(el["avail"]["idx"]) - int(el["index"])) % 65536 == 0


async def _xp(mon: QMP, count: int, unit: str, addr: int) -> list[int]:
    """``count`` units (``b``, ``h``, ``w`` or ``g``: 1, 2, 4 or 8 bytes) of
    guest memory from ``addr``, with the monitor's ``xp``."""
    text = await mon.execute("human-monitor-command", {"command-line": f"xp /{count}{unit}x {addr:#x}"})
    values: list[int] = []
    for line in str(text).splitlines():
        _addr, _, rest = line.partition(":")
        values += [int(w, 16) for w in rest.split()]
    if len(values) != count:
        raise QMPError(f"read {len(values)} of {count} values of guest memory at {addr:#x}")
    return values


# The strides between a guest's RX buffers that :func:`buffer_before`
# believes: a buffer holds a full frame and a header, and a page frag
# (Linux's virtio-net carves its buffers from 32 KiB ones) holds it.
STRIDES = range(1024, 32769)


def buffer_before(bufs: list[tuple[int, int]]) -> int | None:
    """Where the RX buffer the guest posted just before its next posted ones
    lies, when that can be told; ``bufs``: their (address, length), in the
    order it posted them.  A guest that carves its buffers back to back from
    a page (Linux's virtio-net does) posts them one buffer length apart,
    and the one before lies one length back: a length seen as the stride
    from the first to the second (which the third, or the first's own
    length, confirms), or, when the first took the rest of its page (longer
    than the stride after it), the stride from the second to the third that
    is the second's length.  None otherwise: a new page or a new size says
    nothing of the one before."""
    if len(bufs) < 3:
        return None
    (a0, n0), (a1, n1), (a2, _n2) = bufs[:3]
    d0, d1 = a1 - a0, a2 - a1
    if d0 in STRIDES and d0 in (d1, n0):
        stride = d0
    elif d1 in STRIDES and d1 == n1 and n0 > d1:
        stride = d1
    else:
        return None
    return a0 - stride if a0 >= stride else None


async def used_tail(mon: QMP, path: str, queue: int, size: int = 128) -> bytes | None:
    """The first ``size`` bytes of the guest's last used buffer of RX
    ``queue`` (the virtio-net header QEMU wrote, then the frame), from guest
    memory: the used ring's last entry names the buffer's descriptor, which
    holds its address.  When the guest has taken that buffer back and posted
    the descriptor again (it points at a new buffer then), the buffer is the
    one posted just before the device's next one, one stride before it
    (:func:`buffer_before`): each buffer took one descriptor (the device
    has used all it took).  None when neither tells.  Only with the VM
    stopped."""
    st = await mon.execute("x-query-virtio-queue-status", {"path": path, "queue": 2 * queue})
    num, idx = int(st["vring-num"]), int(st["used-idx"])
    if not num or "last-avail-idx" not in st:
        return None
    desc, avail, used = int(st["vring-desc"]), int(st["vring-avail"]), int(st["vring-used"])
    next_avail = int(st["last-avail-idx"])
    # struct vring_used: flags, idx, then {u32 id, u32 len} per slot
    head = (await _xp(mon, 1, "w", used + 4 + 8 * ((idx - 1) % num)))[0]
    if head >= num:
        return None
    # struct vring_avail: flags, idx, then u16 heads; those from the
    # device's next one to the guest's idx are posted and not used yet.
    avail_idx = (await _xp(mon, 1, "h", avail + 2))[0]
    posted = (avail_idx - next_avail) % 65536
    if posted > num:
        return None
    ring = await _xp(mon, num, "h", avail + 4) if posted else []
    heads = [ring[(next_avail + k) % num] for k in range(posted)]
    # struct vring_desc: u64 addr, u32 len, u16 flags, u16 next
    if head not in heads:
        addr = (await _xp(mon, 1, "g", desc + 16 * head))[0]
        return bytes(await _xp(mon, size, "b", addr))
    if next_avail % 65536 != idx % 65536 or posted < 3:
        return None  # (QEMU holds a buffer it took: the last used one is not the one before its next)
    table = await _xp(mon, 2 * num, "g", desc)
    before = buffer_before([(table[2 * h], table[2 * h + 1] & 0xffffffff) for h in heads[:3]])
    if before is None:
        return None
    log.info("RX queue %d of %s: the guest posted its last used buffer's descriptor again; reading the buffer "
             "one stride before its next (%#x)", queue, path, before)
    return bytes(await _xp(mon, size, "b", before))


async def used_lengths(mon: QMP, path: str, queue: int, count: int) -> list[int]:
    """The lengths QEMU wrote into the guest's last ``count`` buffers of RX
    ``queue`` (oldest first): the used ring's entries, read from guest
    memory (``x-query-virtio-queue-status`` for its place, the monitor's
    ``xp``).  Only with the VM stopped: the ring is final then."""
    st = await mon.execute("x-query-virtio-queue-status", {"path": path, "queue": 2 * queue})
    used, num, idx = int(st["vring-used"]), int(st["vring-num"]), int(st["used-idx"])
    count = min(count, num, idx)
    words: list[int] = []
    first = (idx - count) % num
    # struct vring_used: flags, idx (2 bytes each), then {u32 id, u32 len} per slot
    for start, n in ((first, min(count, num - first)), (0, count - min(count, num - first))):
        if not n:
            continue
        text = await mon.execute("human-monitor-command",
                                 {"command-line": f"xp /{2 * n}wx {used + 4 + 8 * start:#x}"})
        for line in str(text).splitlines():
            _addr, _, rest = line.partition(":")
            words += [int(w, 16) for w in rest.split()]
    if len(words) != 2 * count:
        raise QMPError(f"read {len(words)} words of the used ring of {path} queue {queue}, not {2 * count}")
    return words[1::2]
