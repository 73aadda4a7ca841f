"""nftables through its Python bindings: the only module that loads rules.

Rules are loaded and removed atomically, one table per netpass session.
"""

from __future__ import annotations

import logging
from typing import Any

from . import netns
from .errors import KernelError, MissingDependency

log = logging.getLogger(__name__)

def _bindings() -> Any:
    try:
        import nftables  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MissingDependency("the nftables Python bindings are missing: "
                                "apt-get install python3-nftables (scripts/setup links them "
                                "into the venv)") from exc
    return nftables


def available() -> bool:
    try:
        _bindings()
        return True
    except MissingDependency:
        return False


def run(ns: str | None, text: str) -> None:
    """Apply an nft script atomically in namespace ``ns``."""
    nftables = _bindings()
    with netns.entered(ns):
        nft = nftables.Nftables()
        rc, _out, err = nft.cmd(text)
    if rc != 0:
        first = err.strip().splitlines()[0] if err.strip() else "unknown error"
        raise KernelError(f"nft rejected the rules: {first}")

