"""The agent's faults, for real: a session armed on a real destination QEMU
fails right after each step of its arm, and leaves nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netpass import links, netns, procs, tc
from netpass.agent import ARM_STEPS
from netpass.lab.topology import GUEST_MAC, Lab
from netpass.lab.vm import VM

from .conftest import ROOT

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def waiting_vm(guest_image):  # type: ignore[no-untyped-def]
    """A lab namespace with a QEMU waiting for an incoming migration."""
    with Lab(guest_image) as lab:
        vm = VM("dst", lab.ns("dst"), lab.rundir, guest_image, GUEST_MAC, "198.18.0.10/24",
                incoming="defer")
        lab.dst_vm = vm
        vm.start()
        links.wait_for(lab.ns("dst"), "tap0", 10)
        yield lab, vm


@pytest.mark.parametrize("strict", [False, True], ids=["flow", "strict"])
@pytest.mark.parametrize("step", [*ARM_STEPS, ""], ids=[*ARM_STEPS, "none"])
def test_a_failed_arm_leaves_nothing(waiting_vm, step: str, strict: bool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lab, vm = waiting_vm
    ns = lab.ns("dst")
    links_before = set(links.names(ns))
    state = tmp_path / "state"
    out = subprocess.run(netns.exec_argv(ns, [sys.executable, "-m", "tests.arm_fail", vm.qmp, GUEST_MAC,
                                              step, "strict" if strict else "flow", str(state)]),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if step:
        assert res["error"] and f"'{step}'" in res["error"], res
    else:
        assert res["error"] is None, res
    assert res["cleanup_errors"] == [], res
    # No fd of the session stays open (pyroute2's cached netlink sockets may).
    assert [t for t in res["left"].values() if "netlink" not in t] == [], res["left"]
    deadline = time.monotonic() + 5
    while any(procs.alive(p) for p in res["guards"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(procs.alive(p) for p in res["guards"]), "a hold guard outlived its session"
    assert set(links.names(ns)) == links_before, "an ifb or mirror tap was left"
    for direction in ("ingress", "egress"):
        assert tc.filter_prefs(ns, "tap0", direction) == set(), f"a tc filter was left on {direction}"
    assert not any(state.rglob("*.json")), "a hold state file was left"
    assert vm.alive()
