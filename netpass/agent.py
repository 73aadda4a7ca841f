"""``netpass agent``: serves migration sessions on a host.

On the destination it owns a session's replay: it checks every batch,
queues frames into the destination VM's taps before the VM resumes, within
each ring's room, feeds the rest as the VM consumes them, and reports what
happened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from . import destreport, heap, procs, srcguard, tapfd, wire
from . import hold as holdmod
from .blocking import off_loop
from .channel import (
    BATCH,
    CONTROL,
    ERROR,
    AuthError,
    Channel,
    ChannelError,
    Wire,
    parse_hostport,
    serve,
    server_handshake,
)
from .destfeed import Gauge, Replay
from .destflow import Holds
from .deststate import AgentConfig, DestState
from .errors import KernelError, NetpassError, QMPError, SessionError, UsageError
from .follow import Follow
from .metrics import AgentMetrics
from .nics import discover
from .packet import Shadow
from .qmp import QMP, Monitor, peer_pid
from .session import State
from .virt import DomainMonitor

log = logging.getLogger(__name__)

MAX_UNAUTHENTICATED = 64
MAX_UNAUTHENTICATED_PER_ADDRESS = 8
# A session id names the hold's state files: hex only, never a path.
SESSION_ID = re.compile(r"[0-9a-f]{1,64}")


# A source that still sends batches this long after its VM resumed here is
# refused: its linger is bounded by 60 s (--linger-max-ms).
LATE_BATCH_BOUND_S = 90.0
# The source gone before it said the migration completed: how long the agent
# waits to see whether its VM runs here anyway (the migration completed, and
# what the agent holds is the only copy: it goes in) or not (it is dropped:
# the source gives back its own copies when the VM stays there).
SOURCE_LOST_WAIT_S = 30.0
# The arm's steps, in order; a test makes the session fail right after each
# (DestSession.fail_after) and checks that nothing is left.
ARM_STEPS = ("monitor", "checked", "fds", "ring", "tally", "holds", "shadow")
class DestSession(DestState):
    """The destination's I/O for one session: the channel to the source, the
    VM's monitor and taps; the facts it gathers are its ``DestState``."""

    def __init__(self, cfg: AgentConfig, ch: Channel, sid: str, metrics: AgentMetrics | None = None,
                 gauge: Gauge | None = None) -> None:
        """``gauge``: the taps' ring level (None: the kernel's; tests give their own)."""
        super().__init__(cfg, sid)
        self.metrics = metrics
        self.ch = ch
        self.mon: QMP | None = None
        self.feeder: asyncio.Task[None] | None = None
        self.final_report: dict[str, Any] | None = None
        self.cpu0 = time.process_time()  # this agent process's CPU (user + system)
        # Every change the session makes is undone from here, in reverse
        # order, each step on its own: one that fails does not stop the rest.
        self.undo = AsyncExitStack()
        self.cleanup_errors: list[str] = []
        self.fail_after: str | None = None  # tests: fail the arm right after this step
        self.replay = Replay(self, ch, metrics, self, gauge)
        self.holds = Holds(self, self.replay, self)
        self.vm_pidfd: int | None = None

    def _vm_exited(self, pid: int) -> None:
        self._forget_vm_pidfd()
        self.vm_gone = f"the destination QEMU (pid {pid}) exited"
        log.error("session=%s %s", self.sid, self.vm_gone)

    def _forget_vm_pidfd(self) -> None:
        if self.vm_pidfd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.vm_pidfd)
            except (RuntimeError, ValueError):
                pass

    def _check_vm_alive(self) -> None:
        if self.vm_gone:
            raise SessionError("dest_vm_gone", self.vm_gone)

    def _step(self, name: str) -> None:
        if self.fail_after == name:
            raise KernelError(f"failure injected after the arm step '{name}'")

    def on_exit(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Undo ``fn(*args)`` at cleanup, guarded: an error is logged and noted."""
        async def guarded() -> None:
            try:
                res = fn(*args)
                if isinstance(res, Awaitable):
                    await res
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - the rest still runs
                self.cleanup_errors.append(f"{what}: {exc}")
                log.error("session=%s cleanup: %s failed: %s", self.sid, what, exc)
        self.undo.push_async_callback(guarded)

    # -- arming -------------------------------------------------------------------------
    def _check_qmp_path(self, path: str) -> str:
        return check_qmp_socket(path, self.cfg.qmp_root, self.cfg.qemu_uids)

    async def arm(self, req: dict[str, Any]) -> dict[str, Any]:
        dest_qmp, macs, vm = check_open(req)
        if dest_qmp.startswith(LIBVIRT_PREFIX):
            dom_uuid = dest_qmp[len(LIBVIRT_PREFIX):]
            if self.cfg.libvirt_uri is None:
                raise SessionError("libvirt", "this agent does not follow libvirt: start it with --libvirt URI "
                                   "to receive migrations libvirt drives")
            found_pid = await asyncio.to_thread(procs.qemu_by_uuid, dom_uuid)
            if found_pid is None:
                raise SessionError("dest_state", f"no QEMU runs the domain {dom_uuid} on this host")
            pid = found_pid
            vm = {**vm, "uuid": dom_uuid}
            self.mon = DomainMonitor(self.cfg.libvirt_uri, dom_uuid, f"dst-{self.sid}", incoming=True)
        else:
            qmp_path = self._check_qmp_path(dest_qmp)
            pid = peer_pid(qmp_path)
            self.mon = Monitor(qmp_path, f"dst-{self.sid}")
        self.on_exit("closing the QMP connection", self.mon.close)
        await self.mon.connect()
        self._step("monitor")
        status = await self.mon.status()
        if status != "inmigrate":
            raise SessionError("dest_state", f"destination VM is '{status}', not waiting for an "
                               "incoming migration (-incoming)")
        await self._check_vm(vm)
        # The QEMU's exit, seen at once (its taps outlive it while we hold
        # their fds: replaying into them would look like success).
        self.vm_pidfd = tapfd.pidfd_open(pid)
        self.on_exit("closing the destination QEMU's pidfd", os.close, self.vm_pidfd)
        asyncio.get_running_loop().add_reader(self.vm_pidfd, self._vm_exited, pid)
        self.on_exit("forgetting the destination QEMU's pidfd", self._forget_vm_pidfd)
        self._step("checked")
        found = {n.mac: n for n in await discover(self.mon, pid)}
        for mac in macs:
            if mac not in found:
                raise SessionError("nic", f"the destination VM has no NIC with MAC {mac} "
                                   f"(it has {', '.join(found) or 'none'})")
        # Off the loop: a packet ring's setup waits for an RCU grace period
        # (see blocking.py), and the source's beats must still be answered.
        await off_loop(self.replay.take_nics, [found[mac] for mac in macs], pid, self._step)
        strict = req.get("strict")
        # (Registered before they exist: a hold half installed is undone too.)
        self.on_exit("removing the holds", self.holds.remove)
        if strict:
            await self.holds.install_strict(strict)
        else:
            await self.holds.install_flow()
        self._step("holds")
        for dn in self.nics:
            if len(dn.fds) > 1:
                await self.holds.pin_queue(dn, pid)
        loop = asyncio.get_running_loop()
        for dn in self.nics:
            if dn.hold is None:
                # No hold mirrors the live frames: read them to know which the
                # network delivered here itself.
                shadow = Shadow(dn.nic.tap, keep=100_000)  # emptied on every pull
                self.on_exit(f"closing {dn.nic.tap}'s shadow", self._close_shadow, shadow)
                dn.shadow = shadow
                loop.add_reader(shadow.fileno(), self.replay.pull_direct, dn)
        self._step("shadow")
        self.sm.to(State.ARMED)
        return {"nics": [{"mac": d.nic.mac, "tap": d.nic.tap, "ring": d.orig_qlen} for d in self.nics],
                "strict": self.strict}

    async def _check_vm(self, vm: dict[str, str]) -> None:
        """The session is tied to one VM: the destination QEMU must be the
        source VM's incoming twin (the same UUID, and name when it has one)."""
        assert self.mon is not None
        if "uuid" in vm:
            uuid_here = str((await self.mon.execute("query-uuid")).get("UUID", "")).lower()
            if uuid_here != vm["uuid"]:
                raise SessionError("vm", f"the QEMU at the destination socket is VM {uuid_here}, not "
                                   f"{vm['uuid']}: refusing to replay another VM's frames into it")
        if vm.get("name"):
            name_here = str((await self.mon.execute("query-name")).get("name", ""))
            if name_here and name_here != vm["name"]:
                raise SessionError("vm", f"the QEMU at the destination socket is named {name_here!r}, "
                                   f"not {vm['name']!r}")

    # -- replay -------------------------------------------------------------------------
    async def feed_loop(self) -> None:
        """Until the session ends: the replay fed, the holds stepped, the VM's resume seen."""
        while True:
            self._check_vm_alive()
            if not self.running:
                await self._see_resume()
            await self.holds.step()
            pending = any(dn.pending for dn in self.nics)
            if pending:
                self.replay.feed()
            # Right after the feed (a backlog fed fast is told at once), and
            # what accept() and migrated() fed on their own.
            await self.replay.tell_fed()
            if pending:
                # A paused VM reads nothing (accept() and migrated() feed
                # too): polling it only takes CPU from the incoming migration.
                await asyncio.sleep(0.0005 if self.running else 0.002)
            elif self.unconsumed and self.running:
                if all(self.replay.consumed(dn) for dn in self.nics):
                    self.last_consumed_t = time.monotonic()
                    self.unconsumed = False
                await asyncio.sleep(0.0005)
            else:
                await asyncio.sleep(0.002)

    async def _see_resume(self) -> None:
        """The VM here resumed (its own RESUME event): it runs whether or not
        the source's 'migrated' got here (a link cut at the switchover).  The
        frames held for it go in from now on, at its pace; waiting for the
        source, they would wait in the hold until the source is declared
        lost (5 s)."""
        if self.mon is None:
            return
        try:
            while (ev := await self.mon.next_event(0)) is not None:
                if ev.name == "RESUME" and self.resume_t is None:
                    self.resume_t = ev.emitted
                    self.running = True
                    log.info("session=%s the VM resumed here", self.sid)
        except QMPError as exc:
            log.debug("session=%s events: %s", self.sid, exc)

    async def migrated(self, req: dict[str, Any]) -> dict[str, Any]:
        """The source completed: wait for the destination VM to run.

        QEMU starts it by itself, or a management layer that started it with
        ``-S`` continues it; netpass never resumes a VM on its own.
        """
        assert self.mon is not None
        await self._see_resume()  # events queued since arming
        wait_s = req.get("wait_running_s", 30)
        if not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= 120:
            raise SessionError("bad_request", "wait_running_s must be 0 to 120 seconds")
        deadline = time.monotonic() + wait_s
        status = await self.mon.status()
        next_poll = time.monotonic() + 0.05
        while status != "running" and time.monotonic() < deadline:
            self._check_vm_alive()
            ev = await self.mon.next_event(0.002)
            self.replay.feed()
            if ev is not None and ev.name == "RESUME":
                self.resume_t = ev.emitted
                status = "running"
                break
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.05
                status = await self.mon.status()
        if status == "running" and self.resume_t is None:
            self.resume_t = time.monotonic()
        self.replay.feed()
        self.running = status == "running"
        return {"status": status}

    async def finish(self, timeout: float) -> dict[str, Any]:
        """Wait until every queued frame is inside the VM, then report."""
        deadline = time.monotonic() + timeout
        await self.holds.stop_mirrors()
        while time.monotonic() < deadline:
            self._check_vm_alive()
            self.replay.feed()
            # (the ring itself may never be empty: live frames keep coming)
            if not any(dn.pending for dn in self.nics) and \
                    (not self.running or all(self.replay.consumed(dn) for dn in self.nics)):
                break
            await asyncio.sleep(0.001)
        if self.unconsumed or self.last_consumed_t is None:
            self.last_consumed_t = time.monotonic()
        for dn in self.nics:
            if dn.pending:
                dn.drop("not_consumed_in_time", len(dn.pending))
                dn.pending.clear()
        await self.holds.finish(deadline)
        return self.report()

    def report(self) -> dict[str, Any]:
        return destreport.build(self, (time.process_time() - self.cpu0) * 1000)

    def abort(self, reason: str = "aborted") -> dict[str, Any]:
        for dn in self.nics:
            if dn.pending:
                dn.drop(reason, len(dn.pending))
                dn.pending.clear()
        return self.report()

    # -- lifecycle ----------------------------------------------------------------------
    @staticmethod
    def _close_shadow(shadow: Shadow) -> None:
        try:
            asyncio.get_running_loop().remove_reader(shadow.fileno())
        except (RuntimeError, ValueError):
            pass
        shadow.close()

    @staticmethod
    async def _stop_task(task: asyncio.Task[Any]) -> None:
        if not task.done():
            task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a dead task's error was handled
            pass

    def task(self, coro: Awaitable[None], what: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.on_exit(f"stopping the {what}", self._stop_task, task)
        return task

    async def cleanup(self) -> None:
        """Undo everything, newest first; never raises (errors are logged
        and noted in ``cleanup_errors``)."""
        await self.undo.aclose()
        self.nics.clear()

    async def _next(self) -> tuple[int, bytes | memoryview]:
        """The source's next message; or the feeder's failure, if it dies first."""
        if self.feeder is None or self.ch.reader.ready():
            return await self.ch.recv(timeout=600)
        recv = asyncio.ensure_future(self.ch.recv(timeout=600))
        await asyncio.wait({recv, self.feeder}, return_when=asyncio.FIRST_COMPLETED)
        if recv.done():
            return recv.result()
        recv.cancel()
        try:
            await recv
        except (asyncio.CancelledError, ChannelError):
            pass
        exc = None if self.feeder.cancelled() else self.feeder.exception()
        if isinstance(exc, SessionError):
            raise exc
        raise SessionError("replay", f"the replay into the destination VM failed: {exc}")

    async def _on_source_lost(self, exc: ChannelError) -> None:
        """The source went silent or away mid-session.  Frames the agent
        holds are the only copy once the migration completed: if the VM
        runs here (now, or within SOURCE_LOST_WAIT_S), they go in, and the
        session ends as if the source had said 'end'; if not, they are
        dropped (the source gives its own copies back to its VM)."""
        self.source_lost = str(exc)
        if self.running:
            status = "running"
        else:
            try:
                status = (await self.migrated({"wait_running_s": SOURCE_LOST_WAIT_S}))["status"]
            except (QMPError, NetpassError) as qexc:
                status = f"unknown ({qexc})"
        if status != "running":
            log.error("session=%s the source is lost (%s) and the VM here is %s: dropping what the "
                      "session holds", self.sid, exc, status)
            self.abort()
            self.sm.fail(f"source lost: {exc}")
            return
        log.warning("session=%s the source is lost (%s); the VM runs here: delivering what the "
                    "session holds", self.sid, exc)
        if self.sm.state is not State.REPLAYING:
            self._to_replaying()
        await self.finish(10)
        self.sm.to(State.DONE)

    def _shipping(self) -> None:
        """The source stopped its VM (or says it did by what it sends): it is
        capturing and shipping from then on."""
        if self.sm.state is State.ARMED:
            self.sm.to(State.CAPTURING)
            self.sm.to(State.SHIPPING)

    def _to_replaying(self) -> None:
        self._shipping()
        self.sm.to(State.REPLAYING)

    async def _on_batch(self, payload: bytes | memoryview) -> None:
        if self.resume_t is not None and \
                time.monotonic() > self.resume_t + LATE_BATCH_BOUND_S:
            raise SessionError("late", f"a batch {LATE_BATCH_BOUND_S:.0f} s after the VM "
                               "resumed: the session is over")
        self._shipping()
        try:
            ack = self.replay.accept(payload)
        except wire.WireError as exc:
            raise SessionError("bad_batch", f"batch {self.next_seq} rejected: {exc}") from exc
        await self.ch.send_json(CONTROL, {"op": "ack", **ack, "fed": self.fed()})

    async def _on_control(self, msg: dict[str, Any]) -> bool:
        """One control message from the source; True when the session is over."""
        op = msg.get("op")
        if op == "prepare":
            # The park is near: hold from now on (see the source's Parking.prepare_destination).
            await self.holds.close()
        elif op == "settled":
            self.holds.settled()
        elif op == "stopped":
            self._shipping()
            await self.holds.close()
            self.replay.mark_stop()
        elif op == "migrated":
            self._shipping()
            res = await self.migrated(msg)
            self.sm.to(State.REPLAYING)
            await self.ch.send_json(CONTROL, {"op": "resumed", **res})
        elif op == "end":
            timeout = msg.get("timeout", 10)
            if not isinstance(timeout, (int, float)) or not 0 <= timeout <= 60:
                raise SessionError("bad_request", "end.timeout must be 0 to 60 seconds")
            rep = await self.finish(float(timeout))
            self.sm.to(State.DONE)
            rep["state"] = "done"
            await self.ch.send_json(CONTROL, {"op": "report", **rep})
            return True
        elif op == "abort":
            rep = self.abort()
            self.sm.fail(str(msg.get("reason", "aborted by the source")))
            rep["state"] = "failed"
            await self.ch.send_json(CONTROL, {"op": "report", **rep})
            return True
        else:
            raise SessionError("bad_request", f"unknown operation {op!r}")
        return False

    async def run(self, first: dict[str, Any]) -> None:
        ch = self.ch
        try:
            armed = await self.arm(first)
            await ch.send_json(CONTROL, {"op": "armed", "session": self.sid, **armed})
            self.feeder = self.task(self.feed_loop(), "feeder")
            while True:
                try:
                    mtype, payload = await self._next()
                except ChannelError as exc:
                    if isinstance(exc, AuthError):
                        raise
                    await self._on_source_lost(exc)
                    return
                if mtype == BATCH:
                    await self._on_batch(payload)
                elif await self._on_control(_control(payload, mtype)):
                    return
        except SessionError as exc:
            log.error("session=%s refused: %s", self.sid, exc)
            self.sm.fail(str(exc))
            try:
                await ch.send_json(ERROR, {"code": exc.code, "message": str(exc), "report": self.abort(
                    "destination_vm_exited" if exc.code == "dest_vm_gone" else "aborted")})
            except ChannelError:
                pass
        except (ChannelError, QMPError, NetpassError, OSError, ValueError, TypeError) as exc:
            log.error("session=%s failed: %s", self.sid, exc)
            self.sm.fail(str(exc))
            try:
                await ch.send_json(ERROR, {"code": "agent", "message": str(exc)})
            except ChannelError:
                pass
        finally:
            self.final_report = self.report()  # before cleanup forgets the NICs
            await self.cleanup()


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """The agent's TLS context; an unreadable or mismatched certificate and
    key is a UsageError that says which."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError is an OSError
        if isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc):
            why = f"the key {key} does not belong to the certificate {cert}"
        elif isinstance(exc, ssl.SSLError):
            why = f"{cert} or {key} is not a PEM certificate and key ({exc.reason or exc})"
        else:
            why = f"cannot read {exc.filename or cert}: {exc.strerror or exc}"
        raise UsageError(f"TLS: {why}; check --tls-cert and --tls-key") from exc
    return ctx


def check_qmp_socket(path: str, qmp_root: Path, uids: frozenset[int]) -> str:
    """The real path of a QMP socket the agent may open, or a SessionError
    saying why not: it must lie under ``qmp_root``, with no world-writable
    directory from / down to it (anyone could plant a socket there), be a
    socket, and be owned by root or a QEMU user (``uids``)."""
    real = os.path.realpath(path)
    root = os.path.realpath(qmp_root)
    if os.path.commonpath([real, root]) != root:
        raise SessionError("qmp_root", f"QMP socket {path} is outside this agent's --qmp-root {root}")
    try:
        st = os.stat(real)
    except OSError:
        raise SessionError("qmp", f"no QMP socket at {path} on the destination") from None
    for d in Path(real).parents:
        if os.stat(d).st_mode & stat.S_IWOTH:
            raise SessionError("qmp_path", f"{d} is world-writable: anyone could put a socket there; "
                               "give QEMU a QMP socket in a directory only root (or QEMU's user) "
                               "can write")
    if not stat.S_ISSOCK(st.st_mode):
        raise SessionError("qmp", f"{path} is not a socket")
    if st.st_uid not in uids:
        raise SessionError("qmp_owner", f"{path} belongs to uid {st.st_uid}, neither root nor a QEMU user "
                           f"(uids {sorted(uids)}; see the agent's --qemu-user)")
    return real


# check_open's name for an incoming libvirt domain, where a QMP path would be
# (never a path: a QMP socket's path is absolute).
LIBVIRT_PREFIX = "libvirt:"
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_open(req: dict[str, Any]) -> tuple[str, list[str], dict[str, str]]:
    """An 'open' request's fields, checked: (dest_qmp, macs, vm).  Anything
    malformed is refused with a SessionError that says which field."""
    dest_qmp: Any
    if "libvirt_uuid" in req:  # (transparent mode: the incoming domain, by its UUID)
        uuid = req["libvirt_uuid"]
        if not isinstance(uuid, str) or not _UUID.fullmatch(uuid.lower()) or "dest_qmp" in req:
            raise SessionError("bad_request", "libvirt_uuid must be a UUID (and comes without dest_qmp)")
        dest_qmp = LIBVIRT_PREFIX + uuid.lower()
    else:
        dest_qmp = req.get("dest_qmp")
        if isinstance(dest_qmp, str) and dest_qmp.startswith(LIBVIRT_PREFIX):
            raise SessionError("bad_request", "dest_qmp must be a path, not a libvirt domain "
                               "(that is libvirt_uuid)")
    if not isinstance(dest_qmp, str) or not dest_qmp or "\0" in dest_qmp or len(dest_qmp) > 4096:
        raise SessionError("bad_request", "dest_qmp must be a path (a non-empty string without NUL)")
    macs = req.get("macs")
    if not isinstance(macs, list) or not 1 <= len(macs) <= 64 or \
            not all(isinstance(m, str) and _MAC.fullmatch(m.lower()) for m in macs):
        raise SessionError("bad_request", "macs must be a list of 1 to 64 MAC addresses")
    vm = req.get("vm", {})
    if not isinstance(vm, dict) or not all(isinstance(v, str) for v in vm.values()):
        raise SessionError("bad_request", "vm must be an object of strings")
    out: dict[str, str] = {}
    if vm.get("uuid"):
        if not _UUID.fullmatch(vm["uuid"].lower()):
            raise SessionError("bad_request", "vm.uuid must be a UUID")
        out["uuid"] = vm["uuid"].lower()
    if vm.get("name"):
        if len(vm["name"]) > 256 or "\0" in vm["name"]:
            raise SessionError("bad_request", "vm.name must be a short string")
        out["name"] = vm["name"]
    for key in ("resume",):
        if key in req and not isinstance(req[key], bool):
            raise SessionError("bad_request", f"{key} must be true or false")
    if "strict" in req and not isinstance(req["strict"], (dict, bool)):
        raise SessionError("bad_request", "strict must be an object")
    return dest_qmp, [m.lower() for m in macs], out


def _control(payload: bytes | memoryview, mtype: int) -> dict[str, Any]:
    import json

    if mtype != CONTROL:
        raise SessionError("bad_request", f"unexpected message type {mtype}")
    try:
        msg = json.loads(bytes(payload))
    except (ValueError, RecursionError) as exc:
        raise SessionError("bad_request", "malformed control message") from exc
    if not isinstance(msg, dict):
        raise SessionError("bad_request", "control message is not an object")
    return msg


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.sessions: dict[str, DestSession] = {}
        self.unauthenticated = 0
        self.unauthenticated_from: dict[str, int] = {}
        self.server: asyncio.AbstractServer | None = None
        self.metrics = AgentMetrics()
        self.session_tasks: set[asyncio.Task[Any]] = set()
        self.follow: Follow | None = None
        if cfg.libvirt_uri is not None:
            self.follow = Follow(cfg, self._track, self._followed)

    def _track(self, task: asyncio.Task[Any]) -> None:
        self.session_tasks.add(task)
        task.add_done_callback(self.session_tasks.discard)

    def _followed(self, role: str, report: dict[str, Any]) -> None:
        self.metrics.followed.labels(role=role, outcome=str(report.get("state", "failed"))).inc()

    async def start(self) -> None:
        heap.keep_freed()  # batches come and go hundreds of times a second (see heap.py)
        for line in await asyncio.to_thread(holdmod.recover, self.cfg.holds_dir):
            log.warning("startup: %s", line)
        if self.follow is not None:
            # (what a killed agent's source sessions left: as netpass migrate does at its start)
            for line in await asyncio.to_thread(srcguard.recover, self.cfg.state_dir):
                log.warning("startup: %s", line)
            await self.follow.start()
            self._track(asyncio.ensure_future(self.follow.run()))
        if self.cfg.metrics_listen:
            self.metrics.serve(self.cfg.metrics_listen)
        host, port = parse_hostport(self.cfg.listen)
        ctx = None
        if self.cfg.tls_cert:
            ctx = tls_context(self.cfg.tls_cert, self.cfg.tls_key)
        try:
            self.server = await serve(self._handle, host, port, ctx)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.cfg.listen}: {exc.strerror}") from exc
        log.info("agent listening on %s (qmp-root %s)", self.cfg.listen, self.cfg.qmp_root)

    async def serve_forever(self) -> None:
        await self.start()
        assert self.server is not None
        try:
            async with self.server:
                await self.server.serve_forever()
        finally:  # cancelled (SIGTERM): every session ends, undone
            await self.shutdown()

    async def shutdown(self) -> None:
        """End every session: each is cancelled and undoes what it changed."""
        tasks = list(self.session_tasks)
        if tasks:
            log.warning("stopping: ending %d session(s)", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _authenticate(self, ch: Channel, addr: str) -> bool:
        """The handshake, within the caps on connections waiting for one."""
        # Unauthenticated connections are capped, in all and per address (as
        # OpenSSH's MaxStartups): a flood of them costs a few KiB each, for
        # one handshake deadline at most, and cannot crowd a real one out
        # of another address.
        if self.unauthenticated >= MAX_UNAUTHENTICATED or \
                self.unauthenticated_from.get(addr, 0) >= MAX_UNAUTHENTICATED_PER_ADDRESS:
            log.warning("refused %s: too many connections waiting to authenticate", ch.peer)
            return False
        self.unauthenticated += 1
        self.unauthenticated_from[addr] = self.unauthenticated_from.get(addr, 0) + 1
        try:
            await server_handshake(ch, self.cfg.token)
            return True
        except AuthError as exc:
            log.error("refused %s: %s", ch.peer, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - anything a stranger sends ends its connection
            log.error("handshake with %s failed: %s", ch.peer, exc)
            return False
        finally:
            self.unauthenticated -= 1
            left = self.unauthenticated_from.pop(addr, 1) - 1
            if left:
                self.unauthenticated_from[addr] = left

    async def _handle(self, reader: Wire, writer: Any) -> None:
        peer = writer.get_extra_info("peername")
        addr = str(peer[0]) if peer else "?"
        ch = Channel(reader, writer, peer=f"{peer[0]}:{peer[1]}" if peer else "?")
        # Unauthenticated connections are capped, in all and per address (as
        # OpenSSH's MaxStartups): a flood of them costs a few KiB each, for
        # one handshake deadline at most, and cannot crowd a real one out
        # of another address.
        if not await self._authenticate(ch, addr):
            await ch.close()
            return
        try:
            mtype, payload = await ch.recv(timeout=60)
            msg = _control(payload, mtype)
            if msg.get("op") == "ping":
                await ch.send_json(CONTROL, {"op": "pong", "sessions": len(self.sessions)})
                return
            if msg.get("op") == "incoming":  # (a peer's agent, following a libvirt migration: follow.py)
                wanted = msg.get("uuid")
                if not isinstance(wanted, str) or not _UUID.fullmatch(wanted.lower()):
                    raise SessionError("bad_request", "incoming.uuid must be a UUID")
                present = self.follow is not None and await self.follow.has_incoming(wanted.lower())
                await ch.send_json(CONTROL, {"op": "incoming", "present": present})
                return
            if msg.get("op") != "open":
                raise SessionError("bad_request", "expected an 'open' request")
            sid = msg.get("session")
            if sid is None:
                sid = uuid.uuid4().hex[:12]
            if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
                raise SessionError("bad_request", "a session id is 1 to 64 lowercase hex digits")
            if self.follow is not None and isinstance(msg.get("libvirt_uuid"), str):
                self.follow.session_opened(msg["libvirt_uuid"].lower())
            ch.start_beats()  # the source's silence is seen within channel.SILENCE_S
            sess = DestSession(self.cfg, ch, sid, self.metrics)
            self.sessions[sid] = sess
            self.metrics.active.inc()
            log.info("session=%s opened by %s", sid, ch.peer)
            me = asyncio.current_task()
            assert me is not None
            self.session_tasks.add(me)
            try:
                await sess.run(msg)
            finally:
                self.session_tasks.discard(me)
                self.sessions.pop(sid, None)
                if not self.sessions:
                    heap.give_back()  # an idle agent keeps no finished session's cache
                self.metrics.active.dec()
                self.metrics.session_ended(sess.final_report or sess.report())
                if self.follow is not None and isinstance(msg.get("libvirt_uuid"), str):
                    vm = msg.get("vm")
                    self.follow.session_ended(msg["libvirt_uuid"].lower(),
                                              str(vm.get("name", "?")) if isinstance(vm, dict) else "?",
                                              sess.final_report or sess.report())
                log.info("session=%s closed state=%s", sid, sess.sm.state.value)
        except SessionError as exc:
            log.error("refused request from %s: %s", ch.peer, exc)
            try:
                await ch.send_json(ERROR, {"code": exc.code, "message": str(exc)})
            except ChannelError:
                pass
        except ChannelError as exc:
            log.error("connection %s: %s", ch.peer, exc)
        finally:
            await ch.close()
