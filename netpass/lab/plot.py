"""Draw a lab run: each reply over time, the lost probes, the switchover."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MissingDependency


def plot_runs(runs: dict[str, dict[str, Any]], timelines: dict[str, Path], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependency("--plot needs matplotlib: pip install 'netpass[plot]'") from exc
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for ax, (name, stats) in zip(axes[:, 0], runs.items(), strict=True):
        tl = json.loads(timelines[name].read_text())
        send_ms = [u / 1000 for u in tl["send_us"]]
        got = set(tl["reply_id"])
        ax.scatter([u / 1000 for u in tl["reply_us"]], tl["reply_id"], s=1, c="tab:blue",
                   label="reply received")
        lost = [i for i in range(len(send_ms)) if i not in got]
        ax.scatter([send_ms[i] for i in lost], lost, s=4, c="tab:red", marker="x",
                   label=f"probe lost ({len(lost)})")
        for key, colour, label in (("src_stop_ms", "black", "source stops"),
                                   ("dst_resume_ms", "tab:green", "destination resumes")):
            if stats.get(key) is not None:
                ax.axvline(stats[key], color=colour, linestyle="--", linewidth=1, label=label)
        ax.set_title(f"{name}: {stats['lost']} lost of {stats['sent']}, QEMU downtime "
                     f"{stats.get('downtime_ms')} ms, largest gap {stats['gap_ms']:.0f} ms")
        ax.set_xlabel("time since the first probe (ms)")
        ax.set_ylabel("probe id")
        ax.legend(loc="upper left", fontsize=8, markerscale=4)
        if stats.get("src_stop_ms") is not None:
            ax.set_xlim(stats["src_stop_ms"] - 400, (stats.get("dst_resume_ms") or stats["src_stop_ms"]) + 600)
            lo_id = int((stats["src_stop_ms"] - 400) * stats.get("rate", 1000) / 1000)
            hi_id = int(((stats.get("dst_resume_ms") or 0) + 600) * stats.get("rate", 1000) / 1000)
            ax.set_ylim(max(0, lo_id), hi_id)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
