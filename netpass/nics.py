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
from .qmp import Monitor

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


async def discover(mon: Monitor, pid: int) -> list[Nic]:
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


async def virtio_paths(mon: Monitor) -> dict[str, str]:
    """MAC -> QOM path of each virtio-net device, or {} when this QEMU lacks
    the (experimental) virtio introspection commands."""
    from .errors import QMPError

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


async def rx_used(mon: Monitor, path: str, queues: int) -> int:
    """Buffers the device has handed to the guest on its RX queues (mod 2^16 each)."""
    return (await rx_state(mon, path, queues))[0]


async def rx_state(mon: Monitor, path: str, queues: int) -> tuple[int, int]:
    """The RX used index (summed over queues, each mod 2^16) and how many RX
    queues had no buffer from the guest.

    ``x-query-virtio-queue-element`` reads the rings' indexes from guest
    memory (the status query's ``shadow-avail-idx`` is QEMU's cache, equal
    to ``last-avail-idx`` whenever QEMU has caught up, buffers or not).  A
    queue with a buffer holds no frame waiting inside QEMU: QEMU queues a
    frame only after finding no buffer, and delivers it when the guest
    signals a new one.  A queue without one may hold a frame.
    """
    total = starved = 0
    for q in range(queues):
        try:
            el = await mon.execute("x-query-virtio-queue-element", {"path": path, "queue": 2 * q})
            total += int(el["used"]["idx"])
            if (int(el["avail"]["idx"]) - int(el["index"])) % 65536 == 0:
                starved += 1
        except (QMPError, KeyError, TypeError, ValueError):
            st = await mon.execute("x-query-virtio-queue-status", {"path": path, "queue": 2 * q})
            total += int(st["used-idx"])
            starved += 1  # unknown: the frame may be there
    return total, starved


async def _guest_read(mon: Monitor, addr: int, size: int) -> bytes:
    """``size`` bytes of guest-physical memory, through HMP's ``xp``."""
    text = await mon.execute("human-monitor-command", {"command-line": f"xp /{size}xb {addr:#x}"})
    try:
        data = bytes(int(tok, 16) for line in str(text).splitlines() if ":" in line
                     for tok in line.split(":", 1)[1].split())
    except ValueError as exc:
        raise QMPError(f"unexpected xp output: {str(text)[:80]!r}") from exc
    if len(data) != size:
        raise QMPError(f"xp gave {len(data)} bytes of {size}")
    return data


async def last_rx_buffer(mon: Monitor, path: str, nbytes: int = 128) -> tuple[bytes, int] | None:
    """The start of the buffer the device filled last on RX queue 0 (virtio-net
    header, then the frame), read from guest memory, and how many bytes the
    device wrote into it; None if the guest has already given that buffer's
    descriptor back to the device for a new buffer, or nothing was delivered.

    The used ring's last entry names the descriptor; the descriptor, the
    buffer.  A guest that processed the entry may reuse the descriptor for a
    fresh buffer (Linux reuses the one freed last first): then it is among
    the available entries the device has not taken yet, and the buffer no
    longer says anything.
    """
    st = await mon.execute("x-query-virtio-queue-status", {"path": path, "queue": 0})
    num, used, last_avail = int(st["vring-num"]), int(st["used-idx"]), int(st["last-avail-idx"])
    if not num or used == 0:
        return None
    elem = await _guest_read(mon, int(st["vring-used"]) + 4 + 8 * ((used - 1) % num), 8)
    head, written = int.from_bytes(elem[:4], "little"), int.from_bytes(elem[4:], "little")
    if head >= num:
        return None
    avail = await _guest_read(mon, int(st["vring-avail"]), 4 + 2 * num)
    posted = (int.from_bytes(avail[2:4], "little") - last_avail) % 65536
    for i in range(last_avail, last_avail + min(posted, num)):
        if int.from_bytes(avail[4 + 2 * (i % num):6 + 2 * (i % num)], "little") == head:
            return None  # posted again: a fresh buffer
    desc = await _guest_read(mon, int(st["vring-desc"]) + 16 * head, 16)
    addr = int.from_bytes(desc[:8], "little")
    return await _guest_read(mon, addr, min(nbytes, written)), written


@dataclass(frozen=True)
class RxFilter:
    """What a virtio-net NIC accepts, from ``query-rx-filter`` (QEMU's receive_filter)."""

    promiscuous: bool
    broadcast: bool
    unicast: str
    multicast: str
    unicast_overflow: bool
    multicast_overflow: bool
    main_mac: bytes
    unicast_table: frozenset[bytes]
    multicast_table: frozenset[bytes]
    vlan: str
    vlan_table: frozenset[int]

    @classmethod
    def from_qmp(cls, info: dict[str, object]) -> RxFilter:
        def mac(text: object) -> bytes:
            return bytes.fromhex(str(text).replace(":", ""))

        return cls(
            promiscuous=bool(info.get("promiscuous")),
            broadcast=bool(info.get("broadcast-allowed", True)),
            unicast=str(info.get("unicast", "normal")),
            multicast=str(info.get("multicast", "normal")),
            unicast_overflow=bool(info.get("unicast-overflow")),
            multicast_overflow=bool(info.get("multicast-overflow")),
            main_mac=mac(info.get("main-mac", "00:00:00:00:00:00")),
            unicast_table=frozenset(mac(m) for m in info.get("unicast-table", []) or []),  # type: ignore[union-attr]
            multicast_table=frozenset(mac(m) for m in info.get("multicast-table", []) or []),  # type: ignore[union-attr]
            vlan=str(info.get("vlan", "none")),
            vlan_table=frozenset(int(v) for v in info.get("vlan-table", []) or []),  # type: ignore[union-attr]
        )

    def accepts(self, frame: bytes) -> bool:
        if self.promiscuous:
            return True
        if self.vlan == "normal" and frame[12:14] == b"\x81\x00":
            if (int.from_bytes(frame[14:16], "big") & 0x0FFF) not in self.vlan_table:
                return False
        dst = frame[:6]
        if dst[0] & 1:
            if dst == b"\xff" * 6:
                return self.broadcast
            if self.multicast == "none":
                return False
            if self.multicast == "all" or self.multicast_overflow:
                return True
            return dst in self.multicast_table
        if self.unicast == "none":
            return False
        if self.unicast == "all" or dst == self.main_mac or self.unicast_overflow:
            return True
        return dst in self.unicast_table


async def rx_filter(mon: Monitor, name: str) -> RxFilter | None:
    from .errors import QMPError

    try:
        found = await mon.execute("query-rx-filter", {"name": name})
    except QMPError:
        return None
    return RxFilter.from_qmp(found[0]) if found else None
