"""nftables through its Python bindings: the only module that loads rules.

Rules are loaded and removed atomically, one table per netpass session.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import netns
from .errors import KernelError, MissingDependency

log = logging.getLogger(__name__)

def _rules_dir() -> Path:
    """nft-rules/ beside the package in a checkout, or under share/ once installed."""
    import os
    import sys

    for cand in (os.environ.get("NETPASS_NFT_RULES"),
                 Path(__file__).resolve().parent.parent / "nft-rules",
                 Path(sys.prefix) / "share" / "netpass" / "nft-rules"):
        if cand and Path(cand, "steer-egress.nft").is_file():
            return Path(cand)
    raise MissingDependency("the nft-rules templates are missing: reinstall netpass")


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


def render(template: str, **values: str) -> str:
    path = _rules_dir() / template
    text = path.read_text()
    for key, value in values.items():
        text = text.replace("@" + key.upper() + "@", value)
    return text


def table_exists(ns: str | None, family: str, table: str) -> bool:
    nftables = _bindings()
    with netns.entered(ns):
        nft = nftables.Nftables()
        rc, _out, _err = nft.cmd(f"list table {family} {table}")
    return rc == 0


def steer_egress(ns: str | None, table: str, dev: str, park: str) -> None:
    """Send everything leaving toward ``dev`` into ``park`` instead."""
    run(ns, render("steer-egress.nft", table=table, dev=dev, park=park))


def delete_table(ns: str | None, family: str, table: str) -> None:
    if table_exists(ns, family, table):
        run(ns, f"delete table {family} {table}")


def list_tables(ns: str | None, prefix: str) -> list[tuple[str, str]]:
    """(family, name) of every table whose name starts with ``prefix``."""
    nftables = _bindings()
    with netns.entered(ns):
        nft = nftables.Nftables()
        rc, out, _err = nft.cmd("list tables")
    found = []
    for line in out.splitlines() if rc == 0 else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[2].startswith(prefix):
            found.append((parts[1], parts[2]))
    return found
