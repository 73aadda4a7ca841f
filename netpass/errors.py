"""The one exception tree of netpass.

The library raises these; only :mod:`netpass.cli` prints them and picks exit
codes.  Every error carries a message that says what to fix.
"""

from __future__ import annotations


class NetpassError(Exception):
    """Base of every error netpass raises on purpose."""

    exit_code = 1


class PermissionProblem(NetpassError):
    """Missing root, capability or ptrace right."""

    exit_code = 77


class MissingDependency(NetpassError):
    """A program, package or kernel feature netpass needs is absent."""

    exit_code = 69


class UsageError(NetpassError):
    """Bad arguments or configuration given by the user."""

    exit_code = 64


class KernelError(NetpassError):
    """A netlink, tun or socket operation failed."""


class QMPError(NetpassError):
    """QMP could not be reached, or a command failed."""


class LibvirtError(NetpassError):
    """libvirt could not be reached, or refused a call."""


class MigrationFailed(NetpassError):
    """QEMU reported the migration as failed or cancelled."""


class FramesLost(NetpassError):
    """The VM moved, but frames netpass held for it could not all be
    delivered (the channel to the agent broke after QEMU completed): the
    report counts them."""

    exit_code = 4


class LabError(NetpassError):
    """The lab could not be built or run."""


class ImageBuildError(LabError):
    """The guest image could not be built."""


class SessionError(NetpassError):
    """A session request the agent refuses, with a code for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
