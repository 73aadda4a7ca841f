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
