"""The results matrix: every scenario of docs/results.md, run against plain
QEMU and netpass (with and without strict ordering), alternating, N times.

``netpass lab matrix`` prints it as JSON or as the Markdown table the docs
carry.  Each run is a whole lab migration (about 20 s under TCG).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import losses
from .image import GuestImage
from .scenario import ScenarioOptions, run_migration_scenario


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    knobs: dict[str, Any]
    key: bool = False  # the key scenarios run twice as often


SCENARIOS = [
    Scenario("pause-2k", "200 ms pause, 2,000 pps", dict(rate=2000, switchover_pause_ms=200)),
    Scenario("pause-4k", "200 ms pause, 4,000 pps", dict(rate=4000, switchover_pause_ms=200)),
    Scenario("fast-kill", "kill at completion, no pause", dict(rate=2000, switchover_pause_ms=0,
                                                               kill_source=True), key=True),
    Scenario("late-lan-kill", "LAN 300 ms late, kill at completion",
             dict(rate=2000, switchover_pause_ms=100, lan_lag_ms=300, kill_source=True)),
    Scenario("queues-2", "2 queues", dict(rate=2000, switchover_pause_ms=200, queues=2), key=True),
    Scenario("queues-4", "4 queues", dict(rate=2000, switchover_pause_ms=200, queues=4)),
    Scenario("big-frames", "1442-byte frames", dict(rate=2000, switchover_pause_ms=200, frame_size=1442)),
    Scenario("tcp", "TCP flow, 20 Mbit/s", dict(proto="tcp", tcp_rate_mbit=20.0, switchover_pause_ms=200)),
    Scenario("flood", "flood 10,000/s, 40 MiB/s migration",
             dict(rate=2000, switchover_pause_ms=200, flood_pps=10_000, max_bandwidth_mib=40)),
    Scenario("busy-core", "a busy core", dict(rate=2000, switchover_pause_ms=200, busy_core=True), key=True),
    Scenario("flood-busy", "the flood and a busy core",
             dict(rate=2000, switchover_pause_ms=200, flood_pps=10_000, max_bandwidth_mib=40, busy_core=True)),
]

MODES = {"plain": ("baseline", ()), "netpass": ("netpass", ()),
         "strict": ("netpass", ("--strict-ordering",))}


@dataclass
class Cell:
    runs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, res: dict[str, Any]) -> None:
        rep = res.get("report") or {}
        # netpass answers for what was lost from the park until the VM caught
        # up with the hold; a flooded VM's own losses outside that (each
        # shown by a drop counter) are counted apart (losses.py).  A
        # plain run has no report: all its losses count.
        placed = losses.place(res) if res.get("lost") is not None else None
        self.runs.append({
            "lost": placed.in_session if placed else None, "lost_all": res.get("lost"),
            "vms_own": placed.vms_own if placed else None, "unreached": (res["sent"] - res["guest_in_echos"]
                                                   if res.get("sent") is not None and
                                                   res.get("guest_in_echos") is not None else None),
            "reordered": res.get("reordered"), "duplicates": res.get("duplicates"),
            "downtime_ms": res.get("downtime_ms"), "network_pause_ms": res.get("network_pause_ms"),
            "stop_to_resume_ms": rep.get("stop_to_resume_ms"),
            "stall_ms": res.get("stall_ms"), "guest_ack_lag_ms": res.get("guest_ack_lag_ms"),
            "retransmits": res.get("retransmits"),
            "exit_code": rep.get("exit_code"), "swallowed_account": rep.get("swallowed_account"),
            "dropped": rep.get("frames_dropped"), "dest_ring_overflow": rep.get("dest_ring_overflow"),
            "fault": res.get("dst_guest_fault"), "error": rep.get("error"), "notes": rep.get("notes"),
            # Where each run of lost probes falls (lab clock, ms): before the
            # park (the source's own tap ring, tap_ring_overflow), in the
            # session, or after the VM caught up with the hold.
            "lost_runs_ms": res.get("lost_runs_ms"), "pause_start_ms": res.get("pause_start_ms"),
            "dst_resume_ms": res.get("dst_resume_ms"), "hold_caught_up_ms": rep.get("hold_caught_up_ms"),
            "tap_ring_overflow": rep.get("tap_ring_overflow"),
            # How the stop came (a planned park, or QEMU's own stop first)
            # and the endgame's record: which path an unforeseen stop took.
            "stop_path": rep.get("stop_path"), "park_to_stop_ms": rep.get("park_to_stop_ms"),
            "endgame": rep.get("endgame"),
            # What went wrong, kept for a failed run only (one exit 4 in a
            # 60-run matrix left nothing to look at).
            "log_tails": ({k: str(v).splitlines()[-40:] for k, v in (rep.get("logs") or {}).items()}
                          if rep.get("exit_code") not in (0, None) else None)})

    def summary(self) -> dict[str, Any]:
        def med(key: str) -> float | None:
            vals = [r[key] for r in self.runs if r.get(key) is not None]
            return round(statistics.median(vals), 1) if vals else None

        def total(key: str) -> int | None:
            vals = [r[key] for r in self.runs if r.get(key) is not None]
            return sum(vals) if vals else None

        return {"runs": len(self.runs), "lost_total": total("lost"), "lost_max":
                max((r["lost"] for r in self.runs if r.get("lost") is not None), default=None),
                "lost_median": med("lost"), "vms_own_total": total("vms_own"),
                "reordered_total": total("reordered"),
                "duplicates_total": total("duplicates"), "downtime_ms_median": med("downtime_ms"),
                "network_pause_ms_median": med("network_pause_ms"), "stall_ms_median": med("stall_ms"),
                "stop_to_resume_ms_median": med("stop_to_resume_ms"),
                "retransmits_max": max((r["retransmits"] for r in self.runs
                                        if r.get("retransmits") is not None), default=None),
                "accounts": sorted({str(r["swallowed_account"]) for r in self.runs
                                    if r.get("swallowed_account")}),
                "dest_ring_overflow_total": total("dest_ring_overflow"),
                "guest_faults": sum(1 for r in self.runs if r.get("fault"))}


def run(image: GuestImage, runs: int, names: list[str] | None, modes: list[str], extra: dict[str, Any],
        say: Callable[[str], None],
        partial: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run the matrix; returns {scenario: {mode: cell summary, "what": ...}}.
    ``partial`` gets the matrix so far after every run (a long matrix cut
    short keeps what it measured)."""
    out: dict[str, dict[str, Any]] = {}
    for sc in SCENARIOS:
        if names and sc.name not in names:
            continue
        cells = {m: Cell() for m in modes}
        n = runs * 2 if sc.key else runs
        for i in range(n):
            for m in modes:  # alternating, within each run
                mode, args = MODES[m]
                say(f"{sc.name} run {i + 1}/{n}: {m}")
                res = run_migration_scenario(image, ScenarioOptions(mode=mode, migrate_args=args,
                                                                    **{**sc.knobs, **extra}), say)
                cells[m].add(res)
                out[sc.name] = {"what": sc.what, **{k: c.summary() for k, c in cells.items()},
                                "raw": {k: c.runs for k, c in cells.items()}}
                if partial is not None:
                    partial(out)
    return out


def markdown(result: dict[str, dict[str, Any]]) -> str:
    """The matrix as docs/results.md carries it: lost and reordered per mode;
    then, as "plain / netpass / strict", QEMU's downtime, the network's
    pause, the TCP stall and retransmissions (medians; retransmissions at
    most); netpass's stop->resume; the destination rings' overflow; and
    the flooded VM's own losses outside the session (losses.py), which the
    lost columns leave out."""
    lines = ["| scenario | runs | plain lost (median) | netpass lost | netpass reordered | "
             "strict lost | strict reordered | duplicates | QEMU downtime ms | network pause ms | "
             "stop->resume ms, netpass / strict | TCP stall ms | TCP retrans. max | "
             "dest. ring overflow, netpass / strict | VM's own loss, netpass / strict | account |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result.items():
        p, n, s = row.get("plain", {}), row.get("netpass", {}), row.get("strict", {})
        tcp = name == "tcp"

        def g(cell: dict[str, Any], key: str) -> str:
            v = cell.get(key)
            return "-" if v is None else str(v)

        def three(key: str, cells: tuple[dict[str, Any], ...] = (p, n, s)) -> str:
            return " / ".join(g(c, key) for c in cells)

        lines.append(" | ".join([
            f"| {row['what']}", g(n, "runs"),
            "-" if tcp else g(p, "lost_median"),
            "-" if tcp else f"**{g(n, 'lost_total')}**", "-" if tcp else g(n, "reordered_total"),
            "-" if tcp else f"**{g(s, 'lost_total')}**", "-" if tcp else g(s, "reordered_total"),
            "-" if tcp else str((n.get("duplicates_total") or 0) + (s.get("duplicates_total") or 0)),
            three("downtime_ms_median"), three("network_pause_ms_median"),
            f"{g(n, 'stop_to_resume_ms_median')} / {g(s, 'stop_to_resume_ms_median')}",
            three("stall_ms_median") if tcp else "-", three("retransmits_max") if tcp else "-",
            f"{g(n, 'dest_ring_overflow_total')} / {g(s, 'dest_ring_overflow_total')}",
            "-" if tcp else f"{g(n, 'vms_own_total')} / {g(s, 'vms_own_total')}",
            ", ".join(sorted(set(n.get("accounts", []) + s.get("accounts", [])))) + " |"]))
    return "\n".join(lines) + "\n"
