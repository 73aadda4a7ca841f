from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lab_pids(owned: Callable[[int], bool] | None = None) -> list[int]:
    """Pids of QEMU processes and libvirt daemons of lab runs (found by their
    run directory; a lab libvirtd's QEMU dies with its namespace)."""
    import re

    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if (b"qemu-system" in cmd or b"libvirtd" in cmd) and b"/run/netpass-lab/" in cmd:
            m = re.search(rb"/run/netpass-lab/(\d+)-", cmd)
            if owned is None or (m and owned(int(m.group(1)))):
                out.append(int(entry))
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in one tier, so that ``pytest -m unit`` runs anywhere in
    seconds: ``lab`` (real QEMU migrations; marked by their module),
    ``kernel`` (root and real devices, no QEMU: a test that needs
    ``root_required``, directly or through a fixture), ``unit`` (the rest:
    pure logic, no privileges)."""
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if "lab" in marks:
            continue
        if "kernel" in marks or "root_required" in getattr(item, "fixturenames", ()):
            if "kernel" not in marks:
                item.add_marker(pytest.mark.kernel)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def root_required() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("lab tests must run as root in CI")
        pytest.skip("lab tests need root: run sudo scripts/test")


@pytest.fixture(scope="session")
def guest_image(root_required: None):
    from netpass.lab import image

    return image.build()


@pytest.fixture
def no_leftovers(root_required: None):
    """Fail the test if it leaves a lab namespace or a lab QEMU behind."""
    from netpass.lab.topology import leftovers

    def ours(owner: int) -> bool:
        # Labs built by this test process, or by processes that died (a CLI
        # run this test started); not other, unrelated lab runs going on now.
        return owner == os.getpid() or not Path(f"/proc/{owner}").exists()

    def owner_of_ns(name: str) -> int:
        return int(name.split("-")[1])

    before_ns = set(leftovers())
    before_pids = set(lab_pids())
    yield
    time.sleep(0.2)
    left = {n for n in set(leftovers()) - before_ns if ours(owner_of_ns(n))}
    assert left == set(), f"lab namespaces left behind: {left}"
    assert set(lab_pids(ours)) - before_pids == set(), "lab QEMU processes left behind"


def run_cli(*args: str, user: str | None = None, timeout: float = 600,
            **kw: object) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "netpass.cli", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT, **kw)  # type: ignore[arg-type]
