"""The source's faults, for real: 'netpass migrate' fails right after each
of its setup steps, against a real agent and real QEMUs, and leaves
nothing behind: no fd, nft table, parking tap, pinned MAC, state file or
guard process, QEMU's migration settings as they were, the VM running where
it was, and the agent's session ended without a trace."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netpass import netns, procs
from netpass.lab import scenario
from netpass.lab.topology import MIG_DST, Lab
from netpass.qmp import Monitor
from netpass.source import ARM_STEPS

from .conftest import ROOT

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def armed_lab(guest_image):  # type: ignore[no-untyped-def]
    """Both QEMUs (the source running, the destination waiting) and an agent."""
    with Lab(guest_image) as lab:
        lab.start_vms()
        assert lab.src_vm is not None

        async def cont() -> None:
            async with Monitor(lab.src_vm.qmp, "src") as mon:  # type: ignore[union-attr]
                await mon.execute("cont")

        asyncio.run(cont())
        agent = scenario.start_agent(lab, scenario.ScenarioOptions(mode="netpass"))
        try:
            yield lab
        finally:
            scenario.stop_agent(agent)


@pytest.mark.parametrize("step", ARM_STEPS)
def test_a_failed_source_arm_leaves_nothing(armed_lab: Lab, step: str) -> None:
    lab = armed_lab
    assert lab.src_vm is not None and lab.dst_vm is not None
    state = lab.rundir / "src-state"
    out = subprocess.run(netns.exec_argv(lab.ns("src"), [
        sys.executable, "-m", "tests.src_arm_fail", lab.src_vm.qmp, lab.migration_uri,
        f"{MIG_DST}:{scenario.AGENT_PORT}", lab.dst_vm.qmp, str(lab.rundir / "token"), step, str(state)]),
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["error"] and f"'{step}'" in res["error"], res
    assert [t for t in res["left"].values() if "netlink" not in t] == [], res["left"]
    assert not any("cleanup incomplete" in n for n in res["notes"]), res["notes"]
    if res["guard"]:
        deadline = time.monotonic() + 5
        while procs.alive(res["guard"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.alive(res["guard"]), "the guard outlived its session"
    assert res["qemu_after"] == res["qemu_before"], res
    assert scenario.src_leftovers(lab, wait_s=0) == []
    assert scenario.dst_leftovers(lab) == []
    assert lab.src_vm.alive() and lab.dst_vm.alive()
    assert not any(Path(state / "sessions").glob("*.json")) if (state / "sessions").exists() else True
