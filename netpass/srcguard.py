"""The source's guard: what ``netpass migrate`` changed on its host is undone
even if it is killed (SIGKILL) before it can undo it itself.

``netpass migrate`` records each change as it makes it in a state file
(``STATE_DIR/sessions/<session>.json``): its nft table, the MACs it pinned
in a bridge's forwarding table, and QEMU's migration parameters it changed
(with their values before).  A guard process, started at the arm, waits for
``netpass migrate`` to exit.  A clean exit removes the state file first, and
the guard ends; an unclean one leaves it, and the guard undoes what it
lists:

* deletes the nft table (the parking rule would otherwise steer the VM's
  frames into a parking tap that went with the killed process);
* removes the pinned MACs;
* gives QEMU its own ``downtime-limit`` and ``max-bandwidth`` back, so a
  migration still running converges as a plain one (netpass sets the limit
  to 0, which never converges on its own).

The parking taps, the tap fds and the packet sockets are file descriptors
of the killed process: the kernel closes them with it.  Should the guard die
too, the next ``netpass migrate`` on the host undoes what a dead session
left (:func:`recover`).

The guard waits on a pidfd and imports nothing heavy until it has to undo.
It runs isolated (``python -I``, working directory ``/``), like the hold's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def net_ns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


@dataclass
class GuardSpec:
    session: str
    owner_pid: int
    netns: int
    qmp: str
    nft_table: str | None = None
    pins: list[list[str]] = field(default_factory=list)  # [tap, mac]
    qemu_params: dict[str, int] = field(default_factory=dict)  # to restore
    guard_pid: int | None = None

    @classmethod
    def load(cls, path: Path) -> GuardSpec:
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Guard:
    """The state file of one ``netpass migrate`` and its guard process."""

    def __init__(self, state_dir: Path, session: str, qmp: str) -> None:
        self.path = state_dir / "sessions" / f"{session}.json"
        self.spec = GuardSpec(session=session, owner_pid=os.getpid(), netns=net_ns_id(), qmp=qmp)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Write the state file and start the guard process."""
        from .errors import UsageError

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot use the state directory {self.path.parent}: {exc.strerror}") from exc
        self._save()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "netpass.srcguard", "guard", str(self.path), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True, cwd="/")
        self.spec.guard_pid = self._proc.pid
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.spec)))
        os.replace(tmp, self.path)  # whole or not at all, for a guard reading it at any moment

    def record(self, **changes: Any) -> None:
        """A change made (or about to be made): the guard would undo it."""
        for key, value in changes.items():
            setattr(self.spec, key, value)
        self._save()

    def pin(self, tap: str, mac: str) -> None:
        self.spec.pins.append([tap, mac])
        self._save()

    def unpin(self, tap: str, mac: str) -> None:
        if [tap, mac] in self.spec.pins:
            self.spec.pins.remove([tap, mac])
            self._save()

    def close(self) -> None:
        """Everything was undone by its owner: no state, no guard."""
        self.path.unlink(missing_ok=True)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def undo(spec: GuardSpec) -> list[str]:
    """Undo what ``spec`` lists; what could not be undone, as sentences."""
    from . import links, nft
    from .errors import NetpassError

    problems: list[str] = []
    if spec.nft_table:
        try:
            nft.run(None, f"delete table netdev {spec.nft_table}")
        except NetpassError as exc:
            if "No such file" not in str(exc):
                problems.append(f"nft table {spec.nft_table}: {exc}")
    for tap, mac in spec.pins:
        if not links.exists(None, tap):
            continue  # its forwarding entries went with it
        try:
            links.unpin_mac(None, tap, mac)
        except NetpassError as exc:
            problems.append(f"pin of {mac} on {tap}: {exc}")
    if spec.qemu_params:
        problems += _restore_qemu(spec.qmp, spec.qemu_params)
    return problems


def _restore_qemu(qmp: str, params: dict[str, int]) -> list[str]:
    import asyncio

    from .errors import NetpassError
    from .qmp import QMP, Monitor

    async def restore() -> None:
        mon: QMP
        if qmp.startswith("libvirt:"):  # (a migration libvirt drives: its domain, through libvirt)
            from .virt import DomainMonitor

            uuid, _, uri = qmp[len("libvirt:"):].partition("@")
            mon = DomainMonitor(uri, uuid, "guard")
        else:
            mon = Monitor(qmp, "guard")
        await mon.connect()
        try:
            await mon.execute("migrate-set-parameters", params, timeout=5)
        finally:
            await mon.close()

    try:
        asyncio.run(asyncio.wait_for(restore(), 15))
    except (TimeoutError, NetpassError, OSError) as exc:
        if not qmp.startswith("libvirt:") and not os.path.exists(qmp):
            return []  # QEMU is gone: nothing to restore
        if qmp.startswith("libvirt:") and "no domain" in str(exc).lower():
            return []
        return [f"QEMU's migration parameters {params} at {qmp}: {exc or 'timed out'}"]
    return []


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(state_dir: Path) -> list[str]:
    """Undo what sessions of dead ``netpass migrate`` processes (and dead
    guards) left on this host, in this network namespace; what was done."""
    done: list[str] = []
    here = net_ns_id()
    for path in sorted((state_dir / "sessions").glob("*.json")):
        try:
            spec = GuardSpec.load(path)
        except (OSError, ValueError, TypeError) as exc:
            done.append(f"unreadable state file {path}: {exc}")
            continue
        if spec.netns != here or _alive(spec.owner_pid) or _alive(spec.guard_pid):
            continue
        problems = undo(spec)
        path.unlink(missing_ok=True)
        done.append(f"undid what dead session {spec.session} left"
                    + (f" (not all: {'; '.join(problems)})" if problems else ""))
    return done


def guard(path: Path, owner: int) -> int:
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:
        pidfd = None
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll(None):
            pass
        os.close(pidfd)
    time.sleep(0.05)  # (a clean exit removed the file just before)
    if not path.exists():
        return 0
    logging.basicConfig(level=logging.INFO, format="netpass guard: %(message)s", stream=sys.stderr)
    spec = GuardSpec.load(path)
    problems = undo(spec)
    path.unlink(missing_ok=True)
    for p in problems:
        log.error("could not undo: %s", p)
    log.info("netpass migrate %d died: undid what session %s left", owner, spec.session)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netpass.srcguard")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("guard")
    g.add_argument("state", type=Path)
    g.add_argument("owner", type=int)
    args = ap.parse_args(argv)
    return guard(args.state, args.owner)


if __name__ == "__main__":
    sys.exit(main())
