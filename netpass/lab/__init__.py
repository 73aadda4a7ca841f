"""The embedded lab: real QEMU migrations between network namespaces."""
