"""Run by tests/test_source_faults.py inside the source's namespace: a
SourceSession against a real agent and real QEMUs, failed right after one
of its setup steps; prints what this process still has open, its guard,
and QEMU's migration settings afterwards."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

from netpass.errors import NetpassError
from netpass.qmp import Monitor
from netpass.source import SourceSession
from netpass.srcstate import MigrateOptions

from .arm_fail import _fds


async def _qemu(qmp: str) -> dict[str, object]:
    async with Monitor(qmp, "check") as mon:
        params = await mon.execute("query-migrate-parameters")
        caps = {c["capability"]: c["state"] for c in await mon.execute("query-migrate-capabilities")}
        return {"status": await mon.status(), "migration": (await mon.execute("query-migrate")).get("status"),
                "downtime-limit": params.get("downtime-limit"), "max-bandwidth": params.get("max-bandwidth"),
                "events": caps.get("events")}


async def main(qmp: str, uri: str, agent: str, dest_qmp: str, token: str, step: str,
               state: str) -> dict[str, object]:
    before_qemu = await _qemu(qmp)
    before = _fds()
    opts = MigrateOptions(qmp=qmp, uri=uri, dest_agent=agent, dest_qmp=dest_qmp,
                          token=Path(token).read_bytes().strip(), state_dir=Path(state))
    sess = SourceSession(opts)
    sess.fail_after = step
    error = None
    try:
        await sess.run()
    except NetpassError as exc:
        error = str(exc)
    guard = sess.host.guard.spec.guard_pid if sess.host.guard is not None else None
    after = _fds()
    left = {fd: after[fd] for fd in set(after) - set(before)}
    for fd, target in left.items():  # what kind of socket, to say what leaked
        if target.startswith("socket:"):
            try:
                s = socket.socket(fileno=os.dup(int(fd)))
                left[fd] = f"{target} family {s.family!r} type {s.type!r} proto {s.proto}"
                s.close()
            except OSError:
                pass
    return {"error": error, "left": left,
            "guard": guard, "qemu_before": before_qemu, "qemu_after": await _qemu(qmp),
            "notes": sess.notes}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:8]))))
