"""Real QEMU migrations in the lab, without netpass: the loss later tests must beat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from netpass.errors import LabError
from netpass.lab import scenario
from netpass.lab.topology import Lab, leftovers

from .conftest import ROOT, lab_pids, run_cli

pytestmark = pytest.mark.lab


def test_baseline_loses_frames(guest_image, no_leftovers) -> None:
    """Plain migration at 2000 pps with a 200 ms switchover pause loses
    at least half of rate x downtime: the teeth of every zero-loss test."""
    res = scenario.run_migration_scenario(
        guest_image, scenario.ScenarioOptions(rate=2000, switchover_pause_ms=200), lambda m: None)
    # QEMU's own figure is occasionally 0 here (seen 2 times in about 60
    # runs); the switchover lasts at least the 200 ms pause either way.
    downtime = max(res["downtime_ms"] or 0, 200)
    assert res["lost"] >= 0.5 * 2000 * downtime / 1000, str(res)
    assert res["gap_ms"] >= 150
    # Plain QEMU duplicated 3 replies once (a fresh-clone CI on f1c9007; 0 in
    # the 70 plain runs of the matrix on 05c0622 and in 12 runs after):
    # unexplained, so the next one says where its duplicates fall.
    assert res["duplicates"] == 0, {k: res.get(k) for k in (
        "duplicates", "first_duplicate_id", "first_lost_id", "last_lost_id", "src_stop_ms", "dst_resume_ms",
        "first_lost_sent_ms", "last_lost_sent_ms", "downtime_ms", "dst_guest_fault", "dst_tap_dropped", "sent")}


def test_late_lan_and_killed_source_lose_more(guest_image, no_leftovers) -> None:
    """A LAN that keeps sending to the source 300 ms after the resume, with the
    source QEMU killed at completion: the loss covers downtime plus the lag."""
    res = scenario.run_migration_scenario(
        guest_image, scenario.ScenarioOptions(rate=2000, switchover_pause_ms=100, lan_lag_ms=300,
                                              kill_source=True), lambda m: None)
    window_s = (res["downtime_ms"] + 300) / 1000
    assert res["lost"] >= 0.5 * 2000 * window_s, str(res)
    assert res["kill_source"] is True


def test_failure_mid_run_leaves_nothing(guest_image, no_leftovers) -> None:
    seen: dict[str, object] = {}

    def boom(lab: Lab) -> None:
        assert lab.src_vm is not None and lab.dst_vm is not None
        seen["pids"] = [lab.src_vm.pid, lab.dst_vm.pid]
        seen["ns"] = [lab.ns(r) for r in ("lan", "src", "dst", "peer")]
        raise LabError("injected failure")

    with pytest.raises(LabError, match="injected"):
        scenario.run_migration_scenario(guest_image, scenario.ScenarioOptions(), lambda m: None,
                                        lab_hook=boom)
    for pid in seen["pids"]:  # type: ignore[union-attr]
        assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not set(seen["ns"]) & set(leftovers())  # type: ignore[arg-type]


def start_demo(*args: str, pipe: bool = True) -> subprocess.Popen[bytes]:
    """Start 'netpass demo' and return once it runs QEMU."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.PIPE if pipe else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "netpass.cli", *args, "demo", "--json"],
                            cwd=ROOT, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while not lab_pids(lambda owner: owner == proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lab_pids(lambda owner: owner == proc.pid), "the demo never started QEMU"
    return proc


def test_ctrl_c_during_demo_leaves_nothing(guest_image, no_leftovers) -> None:
    proc = start_demo("-v")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted" in err


def test_sigterm_during_demo_leaves_nothing(guest_image, no_leftovers) -> None:
    proc = start_demo()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130


def test_killed_lab_is_swept(guest_image, no_leftovers) -> None:
    """SIGKILL gives no chance to clean: QEMU dies with its parent
    (PDEATHSIG) and 'netpass lab cleanup' removes the namespaces."""
    proc = start_demo(pipe=False)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while lab_pids(lambda owner: owner == proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lab_pids(lambda owner: owner == proc.pid), "QEMU outlived the killed lab"
    mine = [n for n in leftovers() if n.split("-")[1] == str(proc.pid)]
    assert mine, "expected the killed run's namespaces to remain before the sweep"
    demo_dirs = list(Path(tempfile.gettempdir()).glob(f"netpass-demo-{proc.pid}-*"))
    assert demo_dirs, "expected the killed demo's temporary directory to remain before the sweep"
    res = run_cli("lab", "cleanup")
    assert res.returncode == 0, res.stderr
    assert not [n for n in leftovers() if n.split("-")[1] == str(proc.pid)]
    assert not [d for d in demo_dirs if d.exists()], "the killed demo's directory was not swept"


def test_demo_cli_json(guest_image, no_leftovers, tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    res = run_cli("demo", "--mode", "baseline", "--rate", "2000", "--json", "--plot", str(plot))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    base = data["baseline"]
    for key in ("sent", "lost", "reordered", "gap_ms", "downtime_ms"):
        assert key in base
    assert base["lost"] > 0
    assert plot.stat().st_size > 10_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
