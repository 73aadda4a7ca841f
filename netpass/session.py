"""The session state machine, shared by the source and the destination.

    armed -> capturing -> shipping -> replaying -> done
      \\________\\____________\\___________\\______-> failed

``armed``: kernel state is in place (fds taken, rings raised).  ``capturing``:
the VM is stopped and frames are being held.  ``shipping``: frames are
crossing to the destination.  ``replaying``: the destination VM runs and
consumes them.  Every state can fail; ``done`` and ``failed`` are final.
Every transition is logged with the session id and kept with its time.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from .errors import NetpassError

log = logging.getLogger(__name__)


class State(enum.Enum):
    NEW = "new"
    ARMED = "armed"
    CAPTURING = "capturing"
    SHIPPING = "shipping"
    REPLAYING = "replaying"
    DONE = "done"
    FAILED = "failed"


ALLOWED: dict[State, set[State]] = {
    State.NEW: {State.ARMED, State.FAILED},
    State.ARMED: {State.CAPTURING, State.DONE, State.FAILED},
    State.CAPTURING: {State.SHIPPING, State.FAILED},
    State.SHIPPING: {State.REPLAYING, State.FAILED},
    State.REPLAYING: {State.DONE, State.FAILED},
    State.DONE: set(),
    State.FAILED: set(),
}


class StateError(NetpassError):
    """A transition the state machine does not allow (a netpass bug)."""


@dataclass
class StateMachine:
    session_id: str
    state: State = State.NEW
    history: list[tuple[float, str]] = field(default_factory=list)
    reason: str | None = None

    def to(self, new: State, reason: str | None = None) -> None:
        if new not in ALLOWED[self.state]:
            raise StateError(f"session {self.session_id}: {self.state.value} -> {new.value} is not allowed")
        log.info("session=%s state=%s%s", self.session_id, new.value, f" reason={reason}" if reason else "")
        self.state = new
        self.history.append((time.monotonic(), new.value))
        if new is State.FAILED:
            self.reason = reason

    def fail(self, reason: str) -> None:
        if self.state not in (State.DONE, State.FAILED):
            self.to(State.FAILED, reason)

    @property
    def final(self) -> bool:
        return self.state in (State.DONE, State.FAILED)


class Phase(enum.Enum):
    """The source side of a migration, in the order things happen to it.

    ``parked``: the VM's incoming frames go to netpass's parking tap.
    ``stopped``: QEMU stopped the VM (its switchover began).  ``completed``:
    QEMU sent everything.  ``resumed``: the destination VM runs.  Any of
    these may be seen late, out of order, or never (a monitor closed before
    its events were read, a source QEMU killed at once, a management layer
    that stopped the VM first): each is implied by any later one.
    ``giving_back``: the migration failed after the park; the frames go back
    to the source VM.
    """

    NEW = "new"
    ARMED = "armed"
    PARKED = "parked"
    STOPPED = "stopped"
    COMPLETED = "completed"
    RESUMED = "resumed"
    DONE = "done"
    GIVING_BACK = "giving_back"
    FAILED = "failed"


_ORDER = [Phase.NEW, Phase.ARMED, Phase.PARKED, Phase.STOPPED, Phase.COMPLETED, Phase.RESUMED, Phase.DONE]


@dataclass
class Phases:
    """The source's phase, moved only forward.

    :meth:`reach` accepts any later phase of the main line and records the
    ones it skips as implied (the park may come after the stop, in the
    fallback: then ``parked`` is recorded late, never backwards).
    ``giving_back`` may follow ``parked`` or ``stopped``; ``failed`` any
    phase that is not final.  Anything else is a bug and raises.
    """

    session_id: str
    phase: Phase = Phase.NEW
    history: list[tuple[float, str]] = field(default_factory=list)
    reason: str | None = None

    def reach(self, new: Phase, why: str = "") -> bool:
        """Move to ``new`` (and through what it implies); False if already there or past it."""
        if self.phase in (Phase.DONE, Phase.FAILED):
            raise StateError(f"session {self.session_id}: {self.phase.value} is final ({new.value} came after)")
        if new is Phase.FAILED:
            self._set(new, why)
            self.reason = why
            return True
        if new is Phase.GIVING_BACK:
            if self.phase not in (Phase.PARKED, Phase.STOPPED, Phase.COMPLETED):
                raise StateError(f"session {self.session_id}: {self.phase.value} -> giving_back is not allowed")
            self._set(new, why)
            return True
        if self.phase is Phase.GIVING_BACK or new not in _ORDER:
            raise StateError(f"session {self.session_id}: {self.phase.value} -> {new.value} is not allowed")
        here, there = _ORDER.index(self.phase), _ORDER.index(new)
        if there <= here:
            return False
        if new is Phase.DONE and self.phase is not Phase.RESUMED:
            raise StateError(f"session {self.session_id}: done before the destination resumed")
        for skipped in _ORDER[here + 1:there]:
            self._set(skipped, f"implied by {new.value}")
        self._set(new, why)
        return True

    def past(self, phase: Phase) -> bool:
        """Whether ``phase`` of the main line was reached (or implied)."""
        if self.phase in (Phase.GIVING_BACK, Phase.FAILED):
            return any(p == phase.value for _t, p in self.history)
        return _ORDER.index(self.phase) >= _ORDER.index(phase)

    def require(self, *phases: Phase) -> None:
        """Fail loudly when a step runs in a phase it does not belong to."""
        if self.phase not in phases:
            raise StateError(f"session {self.session_id}: not allowed in phase {self.phase.value} "
                             f"(needs {', '.join(p.value for p in phases)})")

    def _set(self, new: Phase, why: str) -> None:
        log.info("session=%s phase=%s%s", self.session_id, new.value, f" ({why})" if why else "")
        self.phase = new
        self.history.append((time.monotonic(), new.value))


@dataclass(frozen=True)
class StopPlan:
    """What the source does when it learns the VM stopped.

    ``park_now``: netpass had not parked (a management layer stopped the
    VM, or QEMU finished sooner than its counters showed): park at once.
    ``settle``: the account of what QEMU swallowed at the stop must be
    made, by draining the VM's rings and reading QEMU's queues: after an
    unforeseen stop, or a park whose sacrificial frames QEMU had not all
    read before it stopped (then a real frame may be inside QEMU).
    """

    park_now: bool
    settle: bool


def plan_stop(parked: bool, verified: bool) -> StopPlan:
    return StopPlan(park_now=not parked, settle=not parked or not verified)
