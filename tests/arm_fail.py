"""Run by tests/test_agent_faults.py inside the destination's namespace:
arm a DestSession on a QEMU waiting for a migration, fail it right after
one step, clean up, and print what this process still has open."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from pathlib import Path

from netpass.agent import DestSession
from netpass.deststate import AgentConfig
from netpass.errors import NetpassError


def _netlink_inodes() -> set[str]:
    lines = Path("/proc/self/net/netlink").read_text().splitlines()[1:]
    return {line.split()[-1] for line in lines}


def _fds() -> dict[str, str]:
    """This process's open fds; netlink sockets (pyroute2's, cached per
    thread and namespace) marked as such."""
    netlink = _netlink_inodes()
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in netlink:
            target = "netlink " + target
        out[fd] = target
    return out


async def main(qmp: str, mac: str, step: str, strict: bool, state: str) -> dict[str, object]:
    cfg = AgentConfig(listen="127.0.0.1:1", token=b"t" * 32, qmp_root=Path(qmp).parent,
                      state_dir=Path(state))
    before = _fds()
    sess = DestSession(cfg, None, "ab12", None)  # type: ignore[arg-type]  # the arm never uses it
    sess.fail_after = step or None
    error = None
    guards: list[int] = []
    try:
        await sess.arm({"dest_qmp": qmp, "macs": [mac],
                        **({"strict": {"hold_timeout_ms": 1000}} if strict else {})})
    except NetpassError as exc:
        error = str(exc)
    finally:
        guards = [dn.hold.spec.guard_pid for dn in sess.nics if dn.hold is not None and dn.hold.spec.guard_pid]
        await sess.cleanup()
    # pyroute2 keeps an event loop (an epoll and a socket pair) in each thread
    # that used it: the executor's threads live on, and with them their loops
    # (a busy core made the executor start one more thread: 'eventpoll' and
    # two sockets were left).  What the session leaks outlives its threads.
    await asyncio.get_running_loop().shutdown_default_executor()
    gc.collect()
    after = _fds()
    return {"error": error, "left": {fd: after[fd] for fd in set(after) - set(before)},
            "cleanup_errors": sess.cleanup_errors, "guards": guards}


if __name__ == "__main__":
    qmp, mac, step, strict, state = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(qmp, mac, step, strict == "strict", state))))
