"""QMP through the qemu.qmp library: the only module that speaks QMP."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError as _LibQMPError
from qemu.qmp.qmp_client import ExecuteError

from .errors import QMPError

log = logging.getLogger(__name__)


@dataclass
class Event:
    """A QMP event.  ``received`` is when netpass read it and ``emitted``
    when QEMU raised it (QEMU's wall-clock stamp moved onto the monotonic
    clock); under TCG the two can differ by tens of milliseconds."""

    name: str
    data: dict[str, Any]
    received: float
    qemu_time: float
    emitted: float

    @classmethod
    def from_msg(cls, msg: Any) -> Event:
        ts = msg.get("timestamp", {})
        now_mono, now_wall = time.monotonic(), time.time()
        qemu_time = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
        emitted = qemu_time - (now_wall - now_mono) if qemu_time else now_mono
        return cls(name=str(msg["event"]), data=dict(msg.get("data", {})),
                   received=now_mono, qemu_time=qemu_time, emitted=min(emitted, now_mono))


class QMP(Protocol):
    """What netpass asks of a QEMU's monitor: :class:`Monitor` (a QMP socket
    of netpass's own) and ``virt.DomainMonitor`` (a libvirt domain's) both
    have it."""

    name: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any: ...

    async def next_event(self, timeout: float) -> Event | None: ...

    async def status(self) -> str: ...


@dataclass
class Monitor:
    """One QMP connection.  Use as ``async with Monitor(path) as mon``."""

    path: str
    name: str = "qmp"
    timeout: float = 10.0
    _client: QMPClient | None = field(default=None, init=False, repr=False)
    _listener: EventListener | None = field(default=None, init=False, repr=False)

    async def __aenter__(self) -> Monitor:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if not os.path.exists(self.path):
            raise QMPError(f"QMP socket {self.path} does not exist: is QEMU running with "
                           f"-qmp unix:{self.path},server=on,wait=off?")
        client = QMPClient(self.name)
        listener = EventListener()
        client.register_listener(listener)
        try:
            async with asyncio.timeout(self.timeout):
                await client.connect(self.path)
        except TimeoutError as exc:
            raise QMPError(f"QMP socket {self.path} did not answer within {self.timeout:.0f} s; "
                           "a QMP monitor takes one client at a time: is another client "
                           "connected to it?") from exc
        except (OSError, _LibQMPError) as exc:
            raise QMPError(f"cannot connect to QMP socket {self.path}: {exc}") from exc
        self._client, self._listener = client, listener

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.disconnect()
            except (OSError, _LibQMPError, EOFError):
                pass
            self._client = None

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        if self._client is None:
            raise QMPError(f"{self.name}: not connected")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await self._client.execute(cmd, args)
        except ExecuteError as exc:
            raise QMPError(f"{self.name}: {cmd} failed: {exc}") from exc
        except TimeoutError as exc:
            raise QMPError(f"{self.name}: {cmd} got no answer in {timeout or self.timeout:.0f} s") from exc
        except (OSError, EOFError, _LibQMPError) as exc:
            raise QMPError(f"{self.name}: connection lost during {cmd}: {exc}") from exc

    async def next_event(self, timeout: float) -> Event | None:
        """The next event, or ``None`` after ``timeout`` seconds (0: only one
        already received; a zero timeout never returns one)."""
        assert self._listener is not None
        if timeout <= 0:
            if self._listener.empty():
                return None
            return Event.from_msg(await self._listener.get())
        try:
            async with asyncio.timeout(timeout):
                msg = await self._listener.get()
        except TimeoutError:
            return None
        return Event.from_msg(msg)

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])


def peer_pid(path: str) -> int:
    """The pid of the QEMU process listening on a QMP unix socket.

    Connecting would take the monitor's single client slot, so this opens
    the connection, reads ``SO_PEERCRED`` and closes it at once; QEMU sees a
    client that leaves without a word.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as exc:
        raise QMPError(f"cannot reach QMP socket {path}: {exc}") from exc
    finally:
        sock.close()
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)
