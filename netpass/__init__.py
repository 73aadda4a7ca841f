"""netpass: zero-loss network switchover for QEMU live migration, from the host."""

__version__ = "0.2.0"
