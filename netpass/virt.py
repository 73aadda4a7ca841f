"""libvirt, through its Python binding: the only module that imports it.

Debian's ``python3-libvirt`` (``scripts/setup`` links it into the venv, as it
does the nftables bindings): libvirt's own client library, so netpass talks
to libvirtd as virsh does, on the URI an operator already uses.  What
netpass needs from it (the transparent mode, ``follow.py``):

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

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import LibvirtError, MissingDependency, QMPError
from .qmp import Event

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
    global _event_impl
    if _event_impl is None:  # (registering a callback needs an event loop, even one never run)
        libvirt.virEventRegisterDefaultImpl()
        _event_impl = "default"
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


# -- a domain's QMP, through libvirt ---------------------------------------------------
_event_impl: str | None = None  # the event loop libvirt dispatches callbacks on (one per process)


def _asyncio_events(libvirt: ModuleType) -> None:
    """libvirt's callbacks on this asyncio loop (its ``libvirtaio``); libvirt
    takes one event implementation per process, registered before any
    connection that wants callbacks."""
    global _event_impl
    if _event_impl == "asyncio":
        return
    if _event_impl is not None:
        raise LibvirtError(f"libvirt already dispatches its events on the {_event_impl} loop in this process")
    import libvirtaio

    libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
    _event_impl = "asyncio"


class _Connection:
    """A connection to libvirt with one QMP event passthrough, and a thread
    for its blocking calls."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._cb: int | None = None
        self._close_cb = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="netpass-libvirt")

    async def _off(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _open(self) -> tuple[ModuleType, ModuleType]:
        """Connect (libvirt's callbacks on this loop, its own printing off);
        the binding's two modules, for what the caller does next."""
        libvirt, libvirt_qemu = _binding()
        libvirt.registerErrorHandler(_ignore, None)
        _asyncio_events(libvirt)
        self._conn = await self._off(libvirt.open, self.uri)
        return libvirt, libvirt_qemu

    async def close(self) -> None:
        libvirt, libvirt_qemu = _binding()
        if self._conn is not None:
            if self._cb is not None:
                try:
                    libvirt_qemu.qemuMonitorEventDeregister(self._conn, self._cb)
                except libvirt.libvirtError:
                    pass
                self._cb = None
            if self._close_cb:
                try:
                    self._conn.unregisterCloseCallback()
                except libvirt.libvirtError:
                    pass
                self._close_cb = False
            try:
                await self._off(self._conn.close)
            except libvirt.libvirtError:
                pass
            self._conn = None
        self._pool.shutdown(wait=False)


class DomainMonitor(_Connection):
    """A domain's QMP through libvirt, with the calls of :class:`qmp.Monitor`
    (``execute``, ``next_event``, ``status``): QMP events come by libvirt's
    passthrough, commands by ``qemuMonitorCommand`` (off the loop: a call
    waits for QEMU's answer)."""

    def __init__(self, uri: str, uuid: str, name: str = "libvirt", timeout: float = 10.0,
                 incoming: bool = False) -> None:
        """``incoming``: the domain migrates to this host (see qemu_status)."""
        super().__init__(uri)
        self.uuid, self.name, self.timeout, self.incoming = uuid, name, timeout, incoming
        self._dom: Any = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    async def __aenter__(self) -> DomainMonitor:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        libvirt, _ = _binding()
        try:
            libvirt, libvirt_qemu = await self._open()
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}") from exc
        try:
            self._dom = await self._off(self._conn.lookupByUUIDString, self.uuid)
            self._cb = libvirt_qemu.qemuMonitorEventRegister(self._conn, self._dom, None, self._on_event, None, 0)
        except libvirt.libvirtError as exc:
            await self.close()
            raise LibvirtError(f"libvirt at {self.uri}, domain {self.uuid}: {exc.get_error_message()}") from exc

    def _on_event(self, _conn: Any, _dom: Any, event: str, seconds: int, micros: int, details: str | None,
                  _opaque: Any) -> None:
        data = json.loads(details) if details else {}
        self._events.put_nowait(Event.from_msg({"event": event, "data": data,
                                                "timestamp": {"seconds": seconds, "microseconds": micros}}))

    async def close(self) -> None:
        await super().close()
        self._dom = None

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        libvirt, libvirt_qemu = _binding()
        if self._dom is None:
            raise QMPError(f"{self.name}: not connected")
        if cmd in _FROM_LIBVIRT and not args and (self.incoming or cmd != "query-status"):
            return await self._from_libvirt(cmd)
        text = json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
        try:
            async with asyncio.timeout(timeout or self.timeout):
                out = await self._off(libvirt_qemu.qemuMonitorCommand, self._dom, text, 0)
        except TimeoutError as exc:
            raise QMPError(f"{self.name}: {cmd} got no answer in {timeout or self.timeout:.0f} s") from exc
        except libvirt.libvirtError as exc:
            raise QMPError(f"{self.name}: {cmd} failed: {exc.get_error_message()}") from exc
        reply = json.loads(out)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(f"{self.name}: {cmd} failed: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")

    async def next_event(self, timeout: float) -> Event | None:
        """The next event, or ``None`` after ``timeout`` seconds (as ``qmp.Monitor``)."""
        if timeout <= 0:
            return None if self._events.empty() else self._events.get_nowait()
        try:
            async with asyncio.timeout(timeout):
                return await self._events.get()
        except TimeoutError:
            return None

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])

    async def _from_libvirt(self, cmd: str) -> Any:
        """What libvirt itself knows of the domain, asked without a job: an
        incoming migration's job holds every QMP command libvirt passes
        through until it ends (measured: a ``query-status`` on the
        destination waited 662 ms, the whole migration)."""
        libvirt, _ = _binding()
        try:
            if cmd == "query-status":
                state, reason = await self._off(self._dom.state)
                return {"status": qemu_status(libvirt, state, reason, self.incoming)}
            if cmd == "query-uuid":
                return {"UUID": self._dom.UUIDString()}
            return {"name": self._dom.name()}
        except libvirt.libvirtError as exc:
            raise QMPError(f"{self.name}: {cmd} failed: {exc.get_error_message()}") from exc

    async def interfaces(self) -> list[tuple[str, str, str]]:
        """(MAC, tap, model) of each of the domain's NICs, from its live XML."""
        libvirt, _ = _binding()
        try:
            xml = await self._off(self._dom.XMLDesc, 0)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"{self.name}: the domain's XML: {exc.get_error_message()}") from exc
        return domain_interfaces(xml)


# QMP queries DomainMonitor answers from libvirt's own view (see _from_libvirt);
# ``query-status`` only for an incoming domain: on the sending host it goes to
# QEMU, where its answer also says that QEMU's main loop ran (srcsettle.py).
_FROM_LIBVIRT = frozenset({"query-status", "query-uuid", "query-name"})


def qemu_status(libvirt: ModuleType, state: int, reason: int, incoming: bool) -> str:
    """QEMU's run state, as far as libvirt's (state, reason) tells it.  A
    domain paused for a migration is ``inmigrate`` on the host that
    receives it (``incoming``) and ``postmigrate`` on the one that sent it:
    libvirt's reason is the same (measured: PAUSED/MIGRATION on both from
    the first MIGRATION event to the end, then STARTING_UP on the
    destination until its Finish resumes it)."""
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "running"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        if reason in (libvirt.VIR_DOMAIN_PAUSED_MIGRATION, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP):
            return "inmigrate" if incoming else "postmigrate"
        return "paused"
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return "guest-panicked"
    if state == libvirt.VIR_DOMAIN_PMSUSPENDED:
        return "suspended"
    return "shutdown"


def domain_interfaces(xml: str) -> list[tuple[str, str, str]]:
    """(MAC, tap, model) of each NIC in a domain's XML that has a tap (a
    ``<target dev>``)."""
    import xml.etree.ElementTree as ET

    out = []
    for iface in ET.fromstring(xml).iterfind("./devices/interface"):
        mac, target, model = iface.find("mac"), iface.find("target"), iface.find("model")
        if mac is None or target is None or not target.get("dev"):
            continue
        out.append((str(mac.get("address", "")).lower(), str(target.get("dev")),
                    str(model.get("type", "?")) if model is not None else "?"))
    return out


# -- every domain's migrations, at one libvirt ----------------------------------------
@dataclass(frozen=True)
class MigrationEvent:
    """One MIGRATION event of one domain, as libvirt passed it through."""

    uuid: str
    name: str
    status: str


class Follower(_Connection):
    """The MIGRATION events of every domain at ``uri`` (one passthrough for
    the whole connection, so domains that arrive later are followed too),
    and the questions the transparent mode asks of a domain by its UUID."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._events: asyncio.Queue[MigrationEvent] = asyncio.Queue()
        self.lost: str | None = None  # why the connection to libvirt closed, once it did

    async def start(self) -> None:
        libvirt, _ = _binding()
        try:
            libvirt, libvirt_qemu = await self._open()
            self._conn.registerCloseCallback(self._on_close, None)
            self._close_cb = True
            self._cb = libvirt_qemu.qemuMonitorEventRegister(self._conn, None, "MIGRATION", self._on_event,
                                                             None, 0)
        except libvirt.libvirtError as exc:
            await self.close()
            raise LibvirtError(f"cannot follow migrations at {self.uri}: {exc.get_error_message()} "
                               "(is libvirtd running, and is this the URI virsh uses?)") from exc

    def _on_event(self, _conn: Any, dom: Any, _event: str, _s: int, _us: int, details: str | None,
                  _opaque: Any) -> None:
        data = json.loads(details) if details else {}
        self._events.put_nowait(MigrationEvent(dom.UUIDString().lower(), dom.name(), str(data.get("status"))))

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self.lost = f"libvirt closed the connection (reason {reason})"
        log.error("%s: %s", self.uri, self.lost)

    async def next(self, timeout: float) -> MigrationEvent | None:
        try:
            async with asyncio.timeout(timeout):
                return await self._events.get()
        except TimeoutError:
            return None

    async def incoming(self, uuid: str) -> bool:
        """Whether the domain ``uuid`` is here, paused for a migration: at
        its first MIGRATION event, that is the host receiving it (the
        sender of a live migration still runs it).  libvirt's own job
        would say which side this is, but asking it waits for the
        incoming migration's end on the receiving host."""
        libvirt, _ = _binding()
        try:
            dom = await self._off(self._conn.lookupByUUIDString, uuid)
            state, reason = await self._off(dom.state)
        except libvirt.libvirtError:
            return False
        return qemu_status(libvirt, state, reason, True) == "inmigrate"
