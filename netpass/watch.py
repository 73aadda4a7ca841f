"""What the source QEMU says about its migration, as facts: sans-IO.

QEMU tells how a migration goes in two ways: its events (``STOP``, and
``MIGRATION`` with a status, once the ``events`` capability is on) and its
answers to ``query-migrate``.  Either can come late or never: a monitor
closed by a kill at completion drops the events not yet read, and a poll
can miss a short status.  :class:`Watch` takes both, in the order they are
read, and says what each one newly tells: the VM stopped, the migration
completed, it failed.  It does no I/O; ``netpass migrate`` (source.py) and
the lab's plain migration (migration.py) feed it what their monitor reads
and act on what it returns.

The VM counts as stopped at the first of:
- a ``STOP`` event (its own emission time is the best one);
- a status that QEMU only reaches with the VM stopped: ``pre-switchover``
  and ``device`` (the switchover), ``completed``.

A later ``STOP`` event moves an earlier estimate back to its emission time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Statuses QEMU reaches only once it has stopped the VM for the switchover.
STOPPED_STATUSES = ("pre-switchover", "device", "completed")
FAILED_STATUSES = ("failed", "cancelled")
# The statuses of a migration under way (not yet ended either way).
ACTIVE = ("setup", "active", "pre-switchover", "device", "cancelling")


@dataclass(frozen=True)
class Stopped:
    """The VM stopped; ``emitted``: the STOP event's time (monotonic), if
    that is how it was seen; ``first``: False for a later, better time."""

    emitted: float | None
    why: str
    first: bool = True


@dataclass(frozen=True)
class Completed:
    emitted: float | None


@dataclass(frozen=True)
class Failed:
    status: str


@dataclass(frozen=True)
class AtPreSwitchover:
    """QEMU paused before the switchover (``pause-before-switchover``):
    it waits for ``migrate-continue``."""


Fact = Stopped | Completed | Failed | AtPreSwitchover


class Watch:
    """One migration, as its events and polls tell it.  Feed with
    :meth:`event` and :meth:`polled`; each returns the new facts, in order."""

    def __init__(self) -> None:
        self.status = "none"
        self.stop_t: float | None = None  # the STOP event's time, once seen
        self.stopped = False
        self.stop_why: str | None = None
        self.completed = False
        self.completed_t: float | None = None
        self.failed: str | None = None
        self.paused_before_switchover = False

    @property
    def ended(self) -> bool:
        return self.completed or self.failed is not None

    def event(self, name: str, data: dict[str, Any], emitted: float | None) -> list[Fact]:
        """One QMP event (any: those that say nothing of the migration give nothing)."""
        if name == "STOP":
            return self._stop(emitted, "STOP event")
        if name == "MIGRATION":
            return self._status(str(data.get("status")), emitted, "status ")
        return []

    def polled(self, info: dict[str, Any]) -> list[Fact]:
        """One ``query-migrate`` answer."""
        return self._status(str(info.get("status", "none")), None, "query-migrate said ")

    def exited_after_park(self) -> list[Fact]:
        """The source QEMU exited after netpass parked, with the monitor's
        last events unread (a kill at completion resets the connection, and
        what was unread is gone): it must have stopped, and the migration is
        taken as ended; the destination's state says where the VM runs."""
        out = self._stop(None, "the source QEMU exited")
        if not self.ended:
            self.completed = True
            out.append(Completed(None))
        return out

    def _stop(self, emitted: float | None, why: str) -> list[Fact]:
        if not self.stopped:
            self.stopped, self.stop_why, self.stop_t = True, why, emitted
            return [Stopped(emitted, why)]
        if emitted is not None and (self.stop_t is None or emitted < self.stop_t):
            self.stop_t = emitted
            return [Stopped(emitted, why, first=False)]
        return []

    def _status(self, status: str, emitted: float | None, via: str) -> list[Fact]:
        if self.ended:
            return []  # the first end is the end (a late poll repeats it)
        self.status = status
        out: list[Fact] = []
        if status in STOPPED_STATUSES:
            out += self._stop(None, f"{via}{status}")
        if status == "pre-switchover" and not self.paused_before_switchover:
            self.paused_before_switchover = True
            out.append(AtPreSwitchover())
        if status == "completed":
            self.completed, self.completed_t = True, emitted
            out.append(Completed(emitted))
        elif status in FAILED_STATUSES:
            self.failed = status
            out.append(Failed(status))
        return out
