"""libvirt, through its Python binding: the only module that imports it.

Debian's ``python3-libvirt`` (``scripts/setup`` links it into the venv, as it
does the nftables bindings): libvirt's own client library, so netpass talks
to libvirtd as virsh does, on the URI an operator already uses.  What
netpass needs from it (issue 16, transparent mode):

* QMP events passed through (``qemuMonitorEventRegister``): MIGRATION, STOP
  and RESUME as QEMU sends them, without a monitor socket of netpass's own.
  libvirt owns the domain's only monitor.
* a QMP command now and then (``qemuMonitorCommand``).  libvirt marks a
  domain that had one as tainted (``custom-monitor``, in the domain's log):
  a note, not a change in how libvirt treats it.

Measured in the lab (QEMU 7.2, libvirt 9.0, TCG): a ``query-status`` through
``qemuMonitorCommand`` took 0.5 ms (median of 50; the slowest 1.3 ms); the
passthrough delivered every MIGRATION status of a ``virsh migrate --live``,
STOP, and libvirt's own ``pre-switchover`` pause.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import LibvirtError, MissingDependency

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"


def _binding() -> tuple[ModuleType, ModuleType]:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as exc:
        raise MissingDependency("libvirt's Python binding is not importable: apt-get install python3-libvirt, "
                                "then run scripts/setup (it links the binding into netpass's venv)") from exc
    return libvirt, libvirt_qemu


@dataclass(frozen=True)
class Probe:
    uri: str
    libvirt_version: str
    hypervisor: str
    domains: int
    passthrough: bool


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


def probe(uri: str = DEFAULT_URI) -> Probe:
    """Whether netpass can follow migrations through the libvirt at ``uri``:
    it connects (read-write: the passthrough needs it), registers a QMP event
    passthrough for every domain and removes it again.  Changes nothing."""
    libvirt, libvirt_qemu = _binding()
    libvirt.registerErrorHandler(_ignore, None)  # (else the binding prints every error to stderr too)
    try:
        libvirt.virEventRegisterDefaultImpl()  # (callbacks need an event loop registered, even unused)
    except libvirt.libvirtError:
        pass
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()} "
                           "(is libvirtd running, and is this the URI virsh uses?)") from exc
    try:
        hyper = f"{conn.getType()} {_version(conn.getVersion())}"
        lib = _version(conn.getLibVersion())
        domains = len(conn.listAllDomains(0))
        try:
            cb_id = libvirt_qemu.qemuMonitorEventRegister(conn, None, "MIGRATION", _ignore, None, 0)
        except libvirt.libvirtError as exc:
            log.info("QMP event passthrough refused at %s: %s", uri, exc)
            passthrough = False
        else:
            libvirt_qemu.qemuMonitorEventDeregister(conn, cb_id)
            passthrough = True
        return Probe(uri, lib, hyper, domains, passthrough)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt at {uri}: {exc.get_error_message()}") from exc
    finally:
        conn.close()


def _ignore(*_args: Any) -> None:
    return None
