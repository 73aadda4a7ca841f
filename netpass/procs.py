"""Whether a process still runs, from /proc: the one place that asks."""

from __future__ import annotations

import time


def alive(pid: int, settle_s: float = 0.0) -> bool:
    """Whether process ``pid`` runs; a zombie counts as gone.  A process
    still running is given ``settle_s`` seconds to go (one being killed)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.02)
