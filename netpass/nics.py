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
from .errors import NetpassError
from .qmp import Monitor

log = logging.getLogger(__name__)


class DiscoveryError(NetpassError):
    """The VM's NICs or taps could not be identified."""


@dataclass
class Nic:
    mac: str
    tap: str
    model: str = "?"
    netdev: str = "?"
    qemu_fds: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"mac": self.mac, "tap": self.tap, "model": self.model, "queues": len(self.qemu_fds)}


_NIC_RE = re.compile(r"^(?P<name>\S+): index=\d+,type=nic,model=(?P<model>[^,]+),macaddr=(?P<mac>[0-9a-f:]{17})", re.I)
_PEER_RE = re.compile(r"^\s*\\\s*(?P<id>[^:]+): index=\d+,type=(?P<type>[^,]+)(?P<rest>.*)$")


def parse_info_network(text: str) -> list[tuple[str, str, str, str, str]]:
    """(model, mac, netdev id, netdev type, options) per NIC from ``info network``."""
    out = []
    current: tuple[str, str] | None = None
    for line in text.splitlines():
        m = _NIC_RE.match(line.strip())
        if m:
            current = (m["model"], m["mac"].lower())
            continue
        p = _PEER_RE.match(line)
        if p and current is not None:
            out.append((current[0], current[1], p["id"].strip(), p["type"], p["rest"]))
            current = None
    return out


async def discover(mon: Monitor, pid: int) -> list[Nic]:
    text = await mon.execute("human-monitor-command", {"command-line": "info network"})
    fds = tapfd.tap_fds_of(pid)
    by_fd = {t.fd: t.ifname for t in fds}
    nics: list[Nic] = []
    for model, mac, netdev, ntype, rest in parse_info_network(str(text)):
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
        nics.append(Nic(mac=mac, tap=ifname, model=model, netdev=netdev, qemu_fds=queue_fds))
    if not nics:
        raise DiscoveryError(f"QEMU pid {pid} has no NIC on a tap backend: nothing for netpass to do")
    return nics
