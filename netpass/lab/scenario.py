"""Lab scenarios: one real migration with a prober running, measured."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import links, netns
from ..errors import LabError
from ..migration import MigrationOptions, MigrationResult, migrate
from ..qmp import Monitor
from .image import GuestImage
from .topology import GUEST_IP, GUEST_MAC, Lab

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class ScenarioOptions:
    rate: float = 2000.0
    proto: str = "icmp"
    switchover_pause_ms: int = 200
    lan_lag_ms: int = 0
    kill_source: bool = False
    warmup_s: float = 1.0
    tail_s: float = 1.0
    max_duration_s: float = 120.0
    downtime_limit_ms: int | None = None
    timeline_path: Path | None = None


def _prober_argv(lab: Lab, opts: ScenarioOptions, duration: float, timeline: Path | None,
                 rate: float | None = None, stop_on_stdin: bool = True) -> list[str]:
    argv = [sys.executable, "-m", "netpass.lab.prober", "--target", GUEST_IP,
            "--rate", str(rate or opts.rate), "--duration", str(duration), "--proto", opts.proto]
    if stop_on_stdin:
        argv.append("--stop-on-stdin")
    if timeline is not None:
        argv += ["--timeline", str(timeline)]
    return netns.exec_argv(lab.ns("peer"), argv)


def wait_reachable(lab: Lab, opts: ScenarioOptions, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(_prober_argv(lab, opts, 0.3, None, rate=50, stop_on_stdin=False),
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and json.loads(out.stdout)["received"] > 0:
            return
        time.sleep(0.2)
    raise LabError(f"the guest at {GUEST_IP} does not answer the peer")


def run_migration_scenario(image: GuestImage, opts: ScenarioOptions, say: Say,
                           lab_hook: Callable[[Lab], Any] | None = None) -> dict[str, Any]:
    """Build a lab, migrate once under probe traffic, tear it all down."""
    with Lab(image) as lab:
        say(f"lab {lab.run_id}: booting the guest under TCG")
        t0 = time.monotonic()
        lab.start_vms()
        assert lab.src_vm is not None and lab.dst_vm is not None

        async def cont() -> None:
            async with Monitor(lab.src_vm.qmp, "src") as mon:  # type: ignore[union-attr]
                await mon.execute("cont")

        asyncio.run(cont())
        lab.src_vm.wait_ready()
        wait_reachable(lab, opts)
        say(f"guest up after {time.monotonic() - t0:.1f} s; probing at {opts.rate:.0f} pps")
        if lab_hook is not None:
            lab_hook(lab)
        if opts.lan_lag_ms > 0:
            # The LAN keeps delivering to the source until we let it learn.
            links.pin_mac(lab.ns("lan"), "p-src", GUEST_MAC)
        timeline = opts.timeline_path
        prober = subprocess.Popen(_prober_argv(lab, opts, opts.max_duration_s, timeline),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        probe_t0 = time.monotonic()
        try:
            time.sleep(opts.warmup_s)
            say("migrating")
            result = asyncio.run(_drive(lab, opts, say))
            if opts.lan_lag_ms > 0:
                assert result.dst_resume_t is not None
                wait = result.dst_resume_t + opts.lan_lag_ms / 1000 - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                links.unpin_mac(lab.ns("lan"), "p-src", GUEST_MAC)
            time.sleep(opts.tail_s)
        finally:
            out, err = prober.communicate(timeout=60)
        if prober.returncode != 0:
            raise LabError(f"prober failed: {err.decode()[-500:]}")
        stats: dict[str, Any] = json.loads(out)
        stats["downtime_ms"] = result.downtime_ms
        stats["total_time_ms"] = result.total_time_ms
        stats["switchover_pause_ms"] = opts.switchover_pause_ms
        stats["lan_lag_ms"] = opts.lan_lag_ms
        stats["kill_source"] = opts.kill_source

        def rel(t: float | None) -> float | None:
            return None if t is None else round((t - probe_t0) * 1000, 1)

        stats["src_stop_ms"] = rel(result.src_stop_t)
        stats["dst_resume_ms"] = rel(result.dst_resume_t)
        return stats


async def _drive(lab: Lab, opts: ScenarioOptions, say: Say) -> MigrationResult:
    assert lab.src_vm is not None and lab.dst_vm is not None
    mopts = MigrationOptions(uri=lab.migration_uri, switchover_pause_ms=opts.switchover_pause_ms,
                             downtime_limit_ms=opts.downtime_limit_ms)
    async with Monitor(lab.src_vm.qmp, "src") as src, Monitor(lab.dst_vm.qmp, "dst") as dst:
        result = await migrate(src, dst, mopts)
    say(f"migration completed: QEMU downtime {result.downtime_ms} ms, total {result.total_time_ms} ms")
    if opts.kill_source:
        lab.src_vm.kill()
    return result
