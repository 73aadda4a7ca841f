"""Links over netlink (pyroute2): bridges, veths, addresses, ring sizes, FDB.

The only module that changes links.  Every function takes the namespace it
acts in (``None`` for the caller's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from .errors import KernelError

log = logging.getLogger(__name__)

NUD_REACHABLE = 0x02
NUD_NOARP = 0x40
NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_STICKY = 0x40
IN6_ADDR_GEN_MODE_NONE = 1  # no link-local address (linux/if_link.h)


F = TypeVar("F", bound=Callable[..., Any])


def loop_safe(fn: F) -> F:
    """pyroute2's synchronous API runs its own event loop, which it cannot do
    inside a running one: from async code, run the call in a helper thread."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        t = threading.Thread(target=target, name=f"netlink-{fn.__name__}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box.get("value")
    return wrapper  # type: ignore[return-value]


def tx_packets(ifname: str) -> int:
    """QEMU's reads from a tap, from sysfs: cheap enough to poll."""
    return _stat(ifname, "tx_packets")


def tx_dropped(ifname: str) -> int:
    """Frames a tap's full ring dropped, from sysfs."""
    return _stat(ifname, "tx_dropped")


class Counter:
    """One statistic of a device, read again and again from one open sysfs
    file (``pread`` at offset 0 makes sysfs format it afresh): 1.4 us a
    read here, against 18 us for opening the file each time."""

    def __init__(self, ifname: str, name: str) -> None:
        self.what = f"{name} of {ifname}"
        try:
            self.fd = os.open(f"/sys/class/net/{ifname}/statistics/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(f"cannot read {self.what}: {exc.strerror}") from exc

    def read(self) -> int:
        try:
            return int(os.pread(self.fd, 32, 0))
        except OSError as exc:  # the device is gone (ENODEV)
            raise KernelError(f"cannot read {self.what}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def active_queues(ifname: str) -> int:
    """The transmit queues a device uses now, from sysfs: for a multi-queue
    tap, the queues attached (QEMU detaches those its guest does not use,
    and tun spreads frames over the attached ones only)."""
    try:
        return max(1, sum(1 for q in os.listdir(f"/sys/class/net/{ifname}/queues") if q.startswith("tx-")))
    except OSError as exc:
        raise KernelError(f"cannot list the queues of {ifname}: {exc.strerror}") from exc


def _stat(ifname: str, name: str) -> int:
    counter = Counter(ifname, name)
    try:
        return counter.read()
    finally:
        counter.close()


@contextlib.contextmanager
def _ipr(ns: str | None) -> Iterator[IPRoute]:
    try:
        handle = NetNS(ns) if ns else IPRoute()
    except (OSError, NetlinkError) as exc:
        raise KernelError(f"cannot open netlink in namespace {ns}: {exc}") from exc
    try:
        yield handle
    except (NetlinkError, OSError) as exc:
        raise KernelError(f"netlink error in namespace {ns or 'of this process'}: {exc}") from exc
    finally:
        handle.close()


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise KernelError(f"no link named {ifname}")
    return int(found[0])


@loop_safe
def add_bridge(ns: str | None, ifname: str) -> None:
    with _ipr(ns) as ipr:
        ipr.link("add", ifname=ifname, kind="bridge")
        idx = _index(ipr, ifname)
        # No STP, no forwarding delay: the lab LAN must forward at once.
        ipr.link("set", index=idx, br_stp_state=0, br_forward_delay=0)
        ipr.link("set", index=idx, state="up")


@loop_safe
def add_veth(ns_a: str | None, name_a: str, ns_b: str | None, name_b: str) -> None:
    """Create a veth pair with one end in each namespace, both up."""
    with _ipr(ns_a) as ipr:
        peer: dict[str, str] = {"ifname": name_b}
        if ns_b != ns_a and ns_b is not None:
            peer["net_ns_fd"] = ns_b  # created straight in place: names may clash
        ipr.link("add", ifname=name_a, kind="veth", peer=peer)
        ipr.link("set", index=_index(ipr, name_a), state="up")
    with _ipr(ns_b) as ipr:
        ipr.link("set", index=_index(ipr, name_b), state="up")


@loop_safe
def add_ifb(ns: str | None, ifname: str) -> None:
    """An intermediate functional block device, up: what tc redirects to it
    from a device's ingress goes back into that device's receive path.

    Silent: no IPv6 link-local address, so the device sends no router
    solicitation or MLD report of its own.  Such a frame went through the
    ifb's qdisc like a redirected one (a hold's plug: it took a place in a
    window) and then counted as one of netpass's primers in the ifb's
    drops (Hold.own_queued).  A kernel without IPv6 has nothing to silence.
    """
    with _ipr(ns) as ipr:
        ipr.link("add", ifname=ifname, kind="ifb")
        index = _index(ipr, ifname)
        try:
            ipr.link("set", index=index, IFLA_AF_SPEC={"attrs": [
                ("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]})]})
        except NetlinkError as exc:
            log.debug("%s keeps its IPv6 address generation: %s", ifname, exc)
        ipr.link("set", index=index, state="up")


@loop_safe
def delete(ns: str | None, ifname: str) -> None:
    """Delete a link; a link already gone is not an error."""
    with _ipr(ns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])


@loop_safe
def set_up(ns: str | None, ifname: str) -> None:
    with _ipr(ns) as ipr:
        ipr.link("set", index=_index(ipr, ifname), state="up")


@loop_safe
def set_mac(ns: str | None, ifname: str, mac: str) -> None:
    with _ipr(ns) as ipr:
        ipr.link("set", index=_index(ipr, ifname), address=mac)


@loop_safe
def enslave(ns: str | None, ifname: str, bridge: str) -> None:
    with _ipr(ns) as ipr:
        ipr.link("set", index=_index(ipr, ifname), master=_index(ipr, bridge), state="up")


@loop_safe
def add_address(ns: str | None, ifname: str, address: str, prefixlen: int) -> None:
    with _ipr(ns) as ipr:
        ipr.addr("add", index=_index(ipr, ifname), address=address, prefixlen=prefixlen)


def disable_ipv6(ifname: str) -> None:
    """No IPv6 on a device of netpass's own (in this process's namespace):
    the host would send its router solicitations and DAD probes through it,
    which a parking tap would take for the VM's frames."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as fh:
            fh.write("1")
    except FileNotFoundError:
        pass  # no IPv6 in this kernel
    except OSError as exc:
        raise KernelError(f"cannot turn IPv6 off on {ifname}: {exc.strerror}") from exc


@loop_safe
def set_txqueuelen(ns: str | None, ifname: str, qlen: int) -> None:
    with _ipr(ns) as ipr:
        ipr.link("set", index=_index(ipr, ifname), txqlen=qlen)


@dataclass(frozen=True)
class LinkInfo:
    ifname: str
    index: int
    mac: str
    txqueuelen: int
    tx_packets: int
    tx_dropped: int
    rx_packets: int
    master: int | None
    mtu: int = 1500
    rx_dropped: int = 0


@loop_safe
def info(ns: str | None, ifname: str) -> LinkInfo:
    with _ipr(ns) as ipr:
        msg = ipr.get_links(_index(ipr, ifname))[0]
    stats = msg.get_attr("IFLA_STATS64") or {}
    return LinkInfo(
        ifname=ifname,
        index=msg["index"],
        mac=msg.get_attr("IFLA_ADDRESS") or "",
        txqueuelen=msg.get_attr("IFLA_TXQLEN") or 0,
        tx_packets=stats.get("tx_packets", 0),
        tx_dropped=stats.get("tx_dropped", 0),
        rx_packets=stats.get("rx_packets", 0),
        master=msg.get_attr("IFLA_MASTER"),
        mtu=msg.get_attr("IFLA_MTU") or 1500,
        rx_dropped=stats.get("rx_dropped", 0),
    )


class KeptSocket:
    """A netlink socket in one namespace, opened when first needed and kept
    until :meth:`close`, for what is polled often (opening one per poll
    costs more than the request).  Not for two threads at once."""

    def __init__(self, ns: str | None) -> None:
        self.ns = ns
        self._ipr: Any = None

    def handle(self) -> Any:
        if self._ipr is None:
            self._ipr = NetNS(self.ns) if self.ns else IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            try:
                ipr.close()
            except OSError:
                pass


class StatsReader(KeptSocket):
    """Devices' counters over a kept socket: a poll is one request
    (:func:`info` opens a socket and makes two, 2 ms on a busy core)."""

    def __init__(self, ns: str | None) -> None:
        super().__init__(ns)
        self._index: dict[str, int] = {}

    @loop_safe
    def stats(self, ifname: str) -> dict[str, int]:
        """``ifname``'s IFLA_STATS64 counters (tx_packets, rx_dropped, ...)."""
        try:
            ipr = self.handle()
            if ifname not in self._index:
                self._index[ifname] = _index(ipr, ifname)
            msg = ipr.get_links(self._index[ifname])[0]
        except (NetlinkError, OSError) as exc:
            self.close()
            raise KernelError(f"reading the counters of {ifname}: {exc}") from exc
        return dict(msg.get_attr("IFLA_STATS64") or {})

    def close(self) -> None:
        self._index.clear()
        super().close()


@loop_safe
def exists(ns: str | None, ifname: str) -> bool:
    with _ipr(ns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


@loop_safe
def name_of(ns: str | None, index: int) -> str | None:
    """The name of the link with this index, or None."""
    with _ipr(ns) as ipr:
        found = ipr.get_links(index)
    return str(found[0].get_attr("IFLA_IFNAME")) if found else None


@loop_safe
def names(ns: str | None) -> list[str]:
    with _ipr(ns) as ipr:
        return [str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()]


def wait_for(ns: str | None, ifname: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not exists(ns, ifname):
        if time.monotonic() > deadline:
            raise KernelError(f"link {ifname} did not appear within {timeout:.0f} s")
        time.sleep(0.02)


@loop_safe
def pin_mac(ns: str | None, port: str, mac: str) -> None:
    """Pin ``mac`` to bridge port ``port`` with a sticky static FDB entry.

    A plain static entry still roams when the MAC is seen elsewhere; a
    sticky one does not (seen in the lab).
    """
    with _ipr(ns) as ipr:
        idx = _index(ipr, port)
        ipr.fdb("replace", ifindex=idx, lladdr=mac, state=NUD_NOARP,
                flags=NTF_MASTER | NTF_STICKY)
    log.debug("pinned %s to %s in %s", mac, port, ns)


@loop_safe
def move_mac(ns: str | None, port: str, mac: str) -> None:
    """Point ``mac`` at bridge port ``port`` as if the bridge had just
    learned it there: a dynamic entry, which ages and roams as learned ones
    do.  (Deleting the old entry instead leaves none, and the bridge floods
    the MAC's frames to every port until it learns it again.)"""
    with _ipr(ns) as ipr:
        idx = _index(ipr, port)
        ipr.fdb("replace", ifindex=idx, lladdr=mac, state=NUD_REACHABLE, flags=NTF_MASTER)
    log.debug("moved %s to %s in %s", mac, port, ns)


@loop_safe
def unpin_mac(ns: str | None, port: str, mac: str) -> None:
    with _ipr(ns) as ipr:
        idx = _index(ipr, port)
        try:
            ipr.fdb("del", ifindex=idx, lladdr=mac, flags=NTF_MASTER)
        except NetlinkError as exc:
            if exc.code != 2:  # ENOENT: already gone
                raise
    log.debug("unpinned %s from %s in %s", mac, port, ns)
