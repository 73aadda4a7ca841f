"""What a destination session knows: the agent's configuration, each
NIC's record, and the facts the session gathers (the VM's resume, the
holds' state, the cache's bytes).  Pure: no asyncio, no kernel, no QMP
(a NIC's record holds its kernel handles, and reads them only when asked).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from . import hold as holdmod
from . import links, tapfd
from .nics import Nic
from .pacing import Window
from .packet import Shadow, Tally, TxRing
from .pending import Pending
from .session import StateMachine

DEFAULT_AGENT_CACHE = 256 << 20


@dataclass
class AgentConfig:
    listen: str
    token: bytes
    qmp_root: Path
    max_cache_bytes: int = DEFAULT_AGENT_CACHE
    tls_cert: str | None = None
    tls_key: str | None = None
    state_dir: Path = Path("/run/netpass")
    metrics_listen: str | None = None
    qemu_uids: frozenset[int] = frozenset({0})  # who may own a QMP socket the agent opens
    # Transparent mode (follow.py): the libvirt this agent follows, the
    # peers' agents it asks which of them receives a domain, and the CA it
    # trusts for their TLS.
    libvirt_uri: str | None = None
    peers: tuple[str, ...] = ()
    peer_tls_ca: str | None = None
    follow_strict: bool = False  # the migrations it follows out keep strict ordering

    @property
    def holds_dir(self) -> Path:
        return self.state_dir / "holds"



@dataclass
class DestNic:
    nic: Nic
    ring: TxRing
    fds: list[int]
    orig_qlen: int
    mac_bytes: bytes = b""
    shadow: Shadow | None = None  # the live frames entering the tap, read (when no hold mirrors them)
    tally: Tally | None = None  # their count only (when a hold mirrors them)
    live_enqueued: int = 0
    last_pos: int = 0
    mark_enq: int = 0
    mark_tx: int = 0
    direct: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    pending: Pending = field(default_factory=Pending)
    replayed: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    hold: holdmod.Hold | None = None
    live_at_stop: int | None = None
    reordered: int = 0
    # Group frames among the forwarded ones that came after live frames had
    # entered the ring: floods, which reach this host directly too.
    late_group: int = 0
    held_times: deque[float] = field(default_factory=lambda: deque(maxlen=65536))
    window: Window | None = None  # the release of its hold's live frames, once it started
    tx_dropped0: int = 0  # the tap's drop counter at arm time
    direct_unicast: int = 0  # frames to the VM's own MAC among those counted in ``direct``
    tx0: int = 0  # QEMU's reads from the tap at arm time (none until the VM runs)
    first_read_t: float | None = None  # when QEMU was first seen reading after that
    tx_counter: links.Counter | None = None  # the tap's tx_packets, kept open (polled often)
    watch: tapfd.Watch | None = None  # whether its ring holds a frame
    pinned_t: float | None = None  # since when every frame toward the VM goes to queue 0
    pinned_ms: float | None = None  # how long that lasted

    def read_tx(self) -> int:
        """QEMU's reads from the tap so far (its tx_packets)."""
        if self.tx_counter is None:
            self.tx_counter = links.Counter(self.nic.tap, "tx_packets")
        return self.tx_counter.read()

    def ring_empty(self) -> bool:
        if self.watch is None:
            self.watch = tapfd.Watch(self.fds)
        return not self.watch.readable()

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class DestState:
    """The facts of one destination session.  Times are ``time.monotonic()``
    values (None: not seen)."""

    def __init__(self, cfg: AgentConfig, sid: str) -> None:
        self.cfg = cfg
        self.sid = sid
        self.sm = StateMachine(sid)
        self.nics: list[DestNic] = []
        self.next_seq = 0
        self.batches = 0
        self.running = False  # the VM runs here
        self.resume_t: float | None = None
        self.last_consumed_t: float | None = None  # the VM had read every frame replayed
        self.unconsumed = False  # frames were replayed since the VM was last seen to have read them all
        self.cache_bytes = 0
        self.strict = False
        self.finishing = False  # the source is done: flow control ends
        self.hold_timeout_ms = 0
        self.hold_closed = False
        self.hold_timed_out = False
        self.hold_notes: list[str] = []
        self.direct_told = False
        self.source_lost: str | None = None
        self.vm_gone: str | None = None

    def holding(self) -> bool:
        return any(dn.hold is not None for dn in self.nics)

    def fed(self) -> int:
        """Frames put into the VM's rings so far, in all: the source counts
        only those as delivered should this agent vanish (a ring outlives
        the agent; its cache does not)."""
        return sum(dn.replayed for dn in self.nics)
