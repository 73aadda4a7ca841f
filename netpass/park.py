"""A parking tap: where the frames toward a VM go from the moment netpass parks them.

The VM's tap keeps its ring and QEMU keeps its fd; netpass adds a tap of its
own (``nppark…``) and, on the VM tap's egress, an nftables chain
(:class:`nft.Steering`) that, once switched on, sends every frame bound for
the VM into the parking tap instead.  Its ring is netpass's to read, in
order, and large (:data:`RING_FRAMES`, set before the device comes up).
QEMU sees an empty ring from then on: nothing it reads at its stop can be a
real frame.

netpass's own frames carry :data:`nft.OWN_MARK` and pass the chain: that is
how the sacrificial frames, and frames given back after a failed migration,
reach the VM's ring while the rest is parked.

The parking tap takes GSO and checksum-offloaded frames as they are
(:func:`tapfd.accept_offloads`), so a TCP segment the host built as one
64 KiB frame arrives as one frame with its virtio-net header, to be replayed
the same way on the destination.  It has IPv6 off, so the host sends
nothing of its own through it.
"""

from __future__ import annotations

import logging
import os
from contextlib import AsyncExitStack

from . import links, nft, tapfd
from .errors import KernelError

log = logging.getLogger(__name__)

PREFIX = "nppark"
RING_FRAMES = 65_536  # 64 Ki frames: 1.6 s of a 40,000 frames/s flood, read as it comes


class Park:
    """The parking tap of one VM tap.  Open with :meth:`open`, which
    registers every undo on ``undo``."""

    def __init__(self, tap: str, name: str, fd: int, steering: nft.Steering) -> None:
        self.tap, self.name, self.fd, self.steering = tap, name, fd, steering
        self._dropped0 = 0

    @classmethod
    def open(cls, tap: str, steering: nft.Steering, undo: AsyncExitStack) -> Park:
        name = f"{PREFIX}{os.urandom(3).hex()}"
        fd = tapfd.open_tap(name, vnet_hdr=True)
        undo.callback(os.close, fd)  # the tap is not persistent: it goes with its fd
        os.set_blocking(fd, False)
        tapfd.accept_offloads(fd)
        links.disable_ipv6(name)
        links.set_txqueuelen(None, name, RING_FRAMES)
        links.set_up(None, name)
        steering.add(tap, name)
        park = cls(tap, name, fd, steering)
        park._dropped0 = links.info(None, name).tx_dropped
        log.info("parking tap %s ready for %s", name, tap)
        return park

    def fileno(self) -> int:
        return self.fd

    @property
    def parked(self) -> bool:
        return self.tap in self.steering.steering

    def park(self) -> None:
        self.steering.steer(self.tap)

    def unpark(self) -> None:
        self.steering.unsteer(self.tap)

    def read(self, limit: int = 256) -> list[bytes]:
        """Up to ``limit`` parked frames (virtio-net header, then the frame), oldest first."""
        return tapfd.drain(self.fd, limit)

    def dropped(self) -> int | None:
        """Frames the parking ring dropped (netpass did not read fast enough)."""
        try:
            return links.info(None, self.name).tx_dropped - self._dropped0
        except KernelError:
            return None
