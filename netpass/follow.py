"""The agent's transparent mode (``netpass agent --libvirt URI``): it follows
the migrations libvirt drives on its host and makes them lossless, while the
operator's ``virsh migrate --live`` (or Nova's call) stays as it was.

* **Outgoing.**  At a domain's MIGRATION ``setup`` (QEMU not ``inmigrate``:
  this host sends it), the agent runs the source side of a session:
  ``source.SourceSession`` attached to the migration, through libvirt
  (``virt.DomainMonitor``).  libvirt issued the migration, and a small
  guest's RAM phase can end within a second, so at once netpass holds QEMU
  back until it is armed (``srcqemu.QemuControl.hold_back``) and, at the same
  time, asks its peers' agents (``--peer``) which one has that domain
  incoming (the ``incoming`` request).  Then it works as ``netpass migrate``
  against that agent.
* **Incoming.**  The agent notes the domain; the source's agent opens the
  session, as ``netpass migrate`` would.  If none did by the time the
  migration completed here, the agent reports that, and why nothing was kept.
* **Reports.**  Each side's report carries the domain's name and UUID; the
  agent logs a line of it, writes it to ``STATE_DIR/reports/``, and counts it
  in its metrics (``netpass_followed_migrations``).

No peer with the domain incoming, or a failure before the arm, changes
nothing: netpass steps aside (every QEMU setting it touched comes back) and
the migration goes on as libvirt started it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .channel import CONTROL, ChannelError, connect
from .deststate import AgentConfig
from .errors import NetpassError
from .source import SourceSession  # (not at the first migration: 60 ms+ before the hold-back)
from .srcstate import MigrateOptions
from .virt import Follower, MigrationEvent

log = logging.getLogger(__name__)

# A peer that has not answered 'incoming' within this is taken as not having it.
ASK_TIMEOUT_S = 3.0
# After the incoming migration completed here: how long a session the source
# opens may still be on its way before the agent reports that none came.
OPEN_GRACE_S = 2.0
RECONNECT_S = 2.0
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class NoPeer(NetpassError):
    """No peer agent has the domain incoming (the message says why)."""


Ended = Callable[[str, dict[str, Any]], None]  # (role, report)


class Follow:
    """One agent's following of its libvirt."""

    def __init__(self, cfg: AgentConfig, track: Callable[[asyncio.Task[Any]], None], ended: Ended) -> None:
        """``track``: the agent keeps each session task (and ends it on
        shutdown); ``ended``: the agent counts a finished report."""
        assert cfg.libvirt_uri is not None
        self.cfg = cfg
        self.follower = Follower(cfg.libvirt_uri)
        self.track, self.ended = track, ended
        self.outgoing: dict[str, asyncio.Task[Any]] = {}
        self.incoming: dict[str, str] = {}  # uuid: name
        self.opened: set[str] = set()  # incoming domains whose source opened a session here

    async def start(self) -> None:
        await self.follower.start()
        log.info("following the migrations of libvirt at %s (peers: %s)", self.cfg.libvirt_uri,
                 ", ".join(self.cfg.peers) or "none")

    async def run(self) -> None:
        """Follow until cancelled; a libvirtd that restarts is followed again
        once it answers (retried every RECONNECT_S)."""
        try:
            while True:
                while self.follower.lost is None:
                    ev = await self.follower.next(1.0)
                    if ev is not None:
                        await self._on(ev)
                log.error("lost libvirt at %s (%s): following again once it answers", self.cfg.libvirt_uri,
                          self.follower.lost)
                await self.follower.close()
                while True:
                    await asyncio.sleep(RECONNECT_S)
                    self.follower = Follower(self.cfg.libvirt_uri or "")
                    try:
                        await self.start()
                        break
                    except NetpassError as exc:
                        log.warning("%s", exc)
        finally:
            await self.follower.close()

    async def has_incoming(self, uuid: str) -> bool:
        """Whether the domain ``uuid`` waits here for an incoming migration."""
        return await self.follower.incoming(uuid)

    def session_opened(self, uuid: str) -> None:
        self.opened.add(uuid)

    def session_ended(self, uuid: str, name: str, report: dict[str, Any]) -> None:
        """A session the source's agent opened here for an incoming domain ended."""
        self._report("destination", name, uuid, {"netpass": True, **report})

    async def _on(self, ev: MigrationEvent) -> None:
        if ev.status == "setup":
            if await self.follower.incoming(ev.uuid):
                self.incoming[ev.uuid] = ev.name
                self.opened.discard(ev.uuid)
                log.info("domain %s (%s): incoming migration", ev.name, ev.uuid)
            elif ev.uuid not in self.outgoing:
                log.info("domain %s (%s): outgoing migration: netpass follows it", ev.name, ev.uuid)
                task = asyncio.ensure_future(self._outgoing(ev.uuid, ev.name))
                self.outgoing[ev.uuid] = task
                self.track(task)
                task.add_done_callback(functools.partial(self._outgoing_done, ev.uuid))
        elif ev.status in ("completed", "failed", "cancelled") and ev.uuid in self.incoming:
            name = self.incoming.pop(ev.uuid)
            if ev.status == "completed":
                task = asyncio.ensure_future(self._check_opened(ev.uuid, name))
                self.track(task)

    def _outgoing_done(self, uuid: str, _task: asyncio.Task[Any]) -> None:
        self.outgoing.pop(uuid, None)

    async def _check_opened(self, uuid: str, name: str) -> None:
        deadline = time.monotonic() + OPEN_GRACE_S
        while uuid not in self.opened and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if uuid in self.opened:
            self.opened.discard(uuid)
            return
        self._report("destination", name, uuid, {
            "state": "not_armed", "netpass": False,
            "error": "the migration completed here and no source agent opened a session for this domain: "
                     "nothing was kept for it (is 'netpass agent --libvirt' running on the source host, "
                     "with this host among its --peer?)"})

    # -- outgoing ---------------------------------------------------------------------
    async def _outgoing(self, uuid: str, name: str) -> None:
        """The source side of a session for a migration libvirt started here.
        QEMU is held back while the peers are asked (``SourceSession.attach``);
        with no peer to take the domain, netpass steps aside and the hold-back
        is undone."""
        async def dest() -> str:
            peer, why = await self.find_peer(uuid)
            if peer is None:
                raise NoPeer(why)
            return peer

        opts = MigrateOptions(qmp="", uri="", dest_agent="", dest_qmp="", token=self.cfg.token,
                              tls_ca=self.cfg.peer_tls_ca, state_dir=self.cfg.state_dir,
                              libvirt_uri=self.cfg.libvirt_uri, libvirt_uuid=uuid,
                              strict_ordering=self.cfg.follow_strict)
        sess = SourceSession(opts, lambda kind, data: None, find_dest=dest)
        try:
            report = await sess.run()
        except NoPeer as exc:
            self._report("source", name, uuid, {
                "state": "not_armed", "netpass": False,
                "error": f"no peer agent has the domain incoming, so netpass stepped aside ({exc})"})
            return
        except Exception as exc:  # noqa: BLE001 - whatever failed is reported; the agent goes on
            if not isinstance(exc, NetpassError):
                log.exception("domain %s (%s): the source session failed", name, uuid)
            report = sess.final_report or sess.report(exc)
        self._report("source", name, uuid, {"peer": sess.o.dest_agent or None, **report})

    async def find_peer(self, uuid: str) -> tuple[str | None, str]:
        """The peer whose agent has ``uuid`` incoming, or None and why not."""
        if not self.cfg.peers:
            return None, "this agent has no --peer"

        async def ask(peer: str) -> tuple[str, bool, str]:
            try:
                ch = await connect(peer, self.cfg.token, self.cfg.peer_tls_ca, timeout=ASK_TIMEOUT_S)
            except (ChannelError, NetpassError) as exc:
                return peer, False, str(exc)
            try:
                await ch.send_json(CONTROL, {"op": "incoming", "uuid": uuid})
                reply = await ch.recv_json(CONTROL, timeout=ASK_TIMEOUT_S)
                present = reply.get("present") is True
                return peer, present, "" if present else f"{peer}: not incoming there"
            except (ChannelError, NetpassError) as exc:
                return peer, False, f"{peer}: {exc}"
            finally:
                await ch.close()

        answers = await asyncio.gather(*(ask(p) for p in self.cfg.peers))
        for peer, present, _ in answers:
            if present:
                return peer, ""
        return None, "; ".join(why for _, _, why in answers)

    # -- reports ----------------------------------------------------------------------
    def _report(self, role: str, name: str, uuid: str, report: dict[str, Any]) -> None:
        report = {"role": role, "vm": {"name": name, "uuid": uuid}, **report}
        path = report_dir(self.cfg.state_dir) / \
            f"{time.strftime('%Y%m%dT%H%M%S')}-{_NAME.sub('_', name)[:64]}-{role}-{report.get('session', 'none')}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            log.error("cannot write the report %s: %s", path, exc)
        if role == "source":
            dropped = report.get("frames_dropped")
            counts = (f", captured {report.get('frames_captured')}, replayed {report.get('frames_replayed')}, "
                      f"dropped {sum(dropped.values()) if isinstance(dropped, dict) else '?'}")
        else:
            nics = report.get("nics") or []
            counts = (f", replayed {sum(int(n.get('replayed', 0)) for n in nics)}, "
                      f"dropped {sum(sum((n.get('dropped') or {}).values()) for n in nics)}")
        line = (f"domain {name} ({uuid}) {role}: {report.get('state')}"
                + (counts if report.get("netpass") else "")
                + (f"; {report['error']}" if report.get("error") else "") + f"; report {path}")
        (log.info if report.get("state") == "done" else log.warning)("%s", line)
        self.ended(role, report)


def report_dir(state_dir: Path) -> Path:
    """Where an agent writes the reports of the migrations it followed."""
    return state_dir / "reports"
