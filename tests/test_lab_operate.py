"""Operating netpass: the agent's metrics and the pcap of a migration, for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from netpass import pcap

from .test_lab_netpass import assert_zero_loss, run

pytestmark = pytest.mark.lab


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text; 0 when absent."""
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_move_and_the_pcap_holds_what_was_replayed(guest_image, no_leftovers, tmp_path: Path) -> None:
    cap = tmp_path / "migration.pcap"
    res = run(guest_image, "netpass", rate=2000, switchover_pause_ms=200, metrics=True,
              migrate_args=("--save-pcap", str(cap)))
    assert_zero_loss(res)
    rep = res["report"]
    before, after = res["metrics_before"], res["metrics_after"]
    # The same counters, before the migration and after, fetched with curl.
    assert metric(before, "netpass_frames_replayed_total") == 0
    assert metric(after, "netpass_frames_replayed_total") == rep["frames_replayed"] > 0
    assert metric(after, "netpass_frames_received_total") == rep["frames_captured"]
    assert metric(after, "netpass_bytes_received_total") == rep["bytes_captured"]
    assert metric(before, "netpass_sessions_total", '{outcome="done"}') == 0
    assert metric(after, "netpass_sessions_total", '{outcome="done"}') == 1
    assert metric(after, "netpass_replay_delay_seconds_count") == 1
    # The pcap: Wireshark's own reader counts as many frames as were replayed.
    assert rep["pcap_frames"] == rep["frames_replayed"]
    assert len(pcap.read(cap.read_bytes())) == rep["frames_replayed"]
    tshark = shutil.which("tshark")
    assert tshark, "tshark is installed by scripts/setup"
    out = subprocess.run([tshark, "-r", str(cap), "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == rep["frames_replayed"]
    icmp = subprocess.run([tshark, "-r", str(cap), "-Y", "icmp.type == 8", "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, timeout=120)
    assert len(icmp.stdout.split()) >= 0.9 * rep["frames_replayed"]  # the probes it carried
