"""Traffic control: the only module that touches qdiscs and filters.

It uses the ``tc`` program from iproute2; probes run in a throw-away
namespace so nothing on the host changes.
"""

from __future__ import annotations

import logging
import subprocess

from . import netns
from .errors import KernelError

log = logging.getLogger(__name__)


def _tc(ns: str | None, *args: str) -> None:
    proc = subprocess.run(netns.exec_argv(ns, ["tc", *args]), capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(f"tc {' '.join(args)}: {proc.stderr.strip() or 'failed'}")


def add_clsact(ns: str | None, dev: str) -> None:
    _tc(ns, "qdisc", "add", "dev", dev, "clsact")


def redirect_all(ns: str | None, dev: str, to: str, direction: str = "ingress") -> None:
    """Redirect every frame of ``dev`` (``ingress`` or ``egress``) to ``to``."""
    _tc(ns, "filter", "add", "dev", dev, direction, "protocol", "all", "u32", "match", "u32",
        "0", "0", "action", "mirred", "egress", "redirect", "dev", to)


def add_plug(ns: str | None, dev: str) -> None:
    _tc(ns, "qdisc", "add", "dev", dev, "root", "plug")
