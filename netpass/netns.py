"""Network namespaces: the only module that creates, enters or deletes them."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence

from pyroute2 import netns as _netns

from .errors import KernelError, UsageError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check(name: str) -> None:
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid namespace name {name!r}: use letters, digits, '_', '.', '-'")


def exists(name: str) -> bool:
    return name in _netns.listnetns()


def list_names() -> list[str]:
    return list(_netns.listnetns())


def create(name: str) -> None:
    """Create a named namespace; it must not exist yet."""
    _check(name)
    if exists(name):
        raise KernelError(f"network namespace {name} already exists")
    try:
        _netns.create(name)
    except OSError as exc:
        raise KernelError(f"cannot create network namespace {name}: {exc}") from exc
    log.debug("created netns %s", name)


def remove(name: str) -> None:
    """Delete a namespace; everything virtual inside it goes with it."""
    if not exists(name):
        return
    try:
        _netns.remove(name)
    except OSError as exc:
        raise KernelError(f"cannot delete network namespace {name}: {exc}") from exc
    log.debug("removed netns %s", name)


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside namespace ``name``.

    ``None`` means stay where we are.  Sockets opened inside keep that
    namespace after the block ends.
    """
    if name is None:
        yield
        return
    if not exists(name):
        raise KernelError(f"network namespace {name} does not exist")
    _netns.pushns(name)
    try:
        yield
    finally:
        _netns.popns()


def exec_argv(name: str | None, argv: Sequence[str]) -> list[str]:
    """Argument vector that runs ``argv`` inside namespace ``name``.

    ``ip netns exec`` execs the program in place, so the pid of the started
    process is the pid of ``argv[0]``.
    """
    if name is None:
        return list(argv)
    _check(name)
    return ["ip", "netns", "exec", name, *argv]


def pids_in(name: str) -> list[int]:
    """Pids of processes whose network namespace is ``name``."""
    path = os.path.join("/run/netns", name)
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return []
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            out.append(int(entry))
    return out
