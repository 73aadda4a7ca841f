"""The process that undoes a destination hold if its agent dies.

It starts at every arm, on the host where the destination VM is about to
run, so it imports nothing heavy until it has something to undo: with
``netpass.hold`` (pyroute2, numpy) at its start it took 0.27 s of CPU there,
at the moment the migration starts (in the lab the two hosts share two
cores, and the source VM, taking a 30,000 frames/s flood, overflowed its
tap's ring).  Waiting needs only the standard library.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def guard(state: Path, owner: int) -> int:
    """Wait for the agent ``owner``; if it dies while ``state`` exists, undo the hold."""
    try:
        pidfd: int | None = os.pidfd_open(owner)
    except ProcessLookupError:
        pidfd = None
    while state.exists() and pidfd is not None:
        ready, _, _ = select.select([pidfd], [], [], 0.1)
        if ready:
            break
    if pidfd is not None:
        os.close(pidfd)
    if not state.exists():
        return 0
    from .errors import NetpassError
    from .hold import Hold, HoldSpec

    try:
        spec = HoldSpec.load(state)
        log.warning("agent %d died holding %s: undoing the hold", owner, spec.tap)
        Hold(spec, state.parent).remove()
    except (NetpassError, OSError, ValueError) as exc:
        log.error("%s", exc)
        state.unlink(missing_ok=True)
        return 1
    return 0


def start(state: Path, owner: int) -> subprocess.Popen[bytes]:
    """The guard of the hold whose state file is ``state``, for the agent ``owner``."""
    # Isolated (-I: no working directory, no PYTHON* variables, no user
    # site on the path) and from /: a netpass/ planted in the agent's
    # working directory ran as root otherwise.
    return subprocess.Popen([sys.executable, "-I", "-m", "netpass.holdguard", str(state), str(owner)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                            cwd="/")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a guard to leave (it does once the state file is gone); end it after 2 s."""
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netpass.holdguard")
    p.add_argument("state", type=Path)
    p.add_argument("owner", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="netpass hold guard: %(message)s")
    return guard(args.state, args.owner)


if __name__ == "__main__":
    raise SystemExit(main())
