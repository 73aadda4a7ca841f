"""Unit tests for the prober's pure parts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from netpass.lab import prober


def send_times(n: int, step_ns: int = 500_000) -> list[int]:
    return [1_000_000_000 + i * step_ns for i in range(n)]


def test_no_loss() -> None:
    tx = send_times(10)
    rx = [(i, t + 100_000) for i, t in enumerate(tx)]
    s = prober.analyse(tx, rx)
    assert (s.sent, s.received, s.lost, s.reordered, s.duplicates) == (10, 10, 0, 0, 0)
    assert s.max_burst_lost == 0 and s.first_lost_id is None
    assert abs(s.latency_p50_ms - 0.1) < 1e-9
    assert abs(s.gap_ms - 0.5) < 1e-9


def test_burst_loss_and_gap() -> None:
    tx = send_times(100)
    rx = [(i, t + 50_000) for i, t in enumerate(tx) if not 40 <= i < 60]
    s = prober.analyse(tx, rx)
    assert s.lost == 20 and s.max_burst_lost == 20
    assert (s.first_lost_id, s.last_lost_id) == (40, 59)
    assert s.last_lost_sent_ns == tx[59]  # when it went, for the lab to set against its own times
    assert s.first_lost_sent_ns == tx[40]
    assert s.lost_runs == [[tx[40], tx[59], 20]]
    two = prober.analyse(tx, [(i, t + 50_000) for i, t in enumerate(tx) if i not in (10, 11, 99)])
    assert two.lost_runs == [[tx[10], tx[11], 2], [tx[99], tx[99], 1]]
    assert abs(s.gap_ms - 21 * 0.5) < 1e-6


def test_reordered_and_duplicates() -> None:
    tx = send_times(5)
    rx = [(0, tx[0] + 1), (2, tx[2] + 1), (1, tx[2] + 2), (2, tx[2] + 3), (3, tx[3] + 1),
          (4, tx[4] + 1)]
    s = prober.analyse(tx, rx)
    assert s.reordered == 1 and s.duplicates == 1 and s.lost == 0
    assert s.first_reordered_id == 1  # the one that came after id 2
    assert s.first_reordered_rx_ms == round((tx[2] + 2 - tx[0]) / 1e6, 1)
    assert s.reorders == [[1, tx[2] + 2, 2]]


def test_foreign_ids_are_ignored() -> None:
    tx = send_times(3)
    s = prober.analyse(tx, [(7, tx[0]), (-1, tx[0]), (0, tx[0] + 5)])
    assert s.received == 1 and s.lost == 2


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert prober.percentile(values, 50) == 50.0
    assert prober.percentile(values, 99) == 99.0
    assert prober.percentile([], 50) == 0.0


def test_echo_request_checksum_and_id_roundtrip() -> None:
    pkt = prober._echo_request(0x1234, 987654321, 42)
    assert prober._checksum(pkt) == 0
    assert prober._find_probe_id(pkt[8:]) == 987654321


@given(st.lists(st.integers(min_value=0, max_value=49), max_size=120))
def test_counts_are_consistent(ids: list[int]) -> None:
    tx = send_times(50)
    rx = [(i, tx[i] + 10 + k) for k, i in enumerate(ids)]
    s = prober.analyse(tx, rx)
    assert s.received == len(set(ids))
    assert s.lost == 50 - len(set(ids))
    assert s.duplicates == len(ids) - len(set(ids))
    assert 0 <= s.reordered <= s.received


def test_guest_counters_skip_a_line_still_being_written(tmp_path) -> None:
    """The guest writes its counters line by line to the console; a read can
    catch the newest one half written, or cut by a kernel message."""
    from netpass.lab.scenario import guest_counters

    def stat(in_echos: int) -> str:
        icmp = ["Icmp:"] + [str(v) for v in [0] * 8 + [in_echos] + [0] * 5 + [in_echos, 3]]
        return "NETPASS-STAT eth0: 1 2 3 | " + " ".join(icmp) + "\n"

    console = tmp_path / "console"
    console.write_text(stat(100) + stat(250) + "[ 9.1] some kernel message\n" + stat(300)[:40])
    assert guest_counters([console]) == {"guest_in_echos": 250, "guest_icmp_out_msgs": 250,
                                         "guest_icmp_out_errors": 3, "guest_rx_dropped": None}
    # With a whole /proc/net/dev line, eth0's receive drops too.
    console.write_text(stat(100).replace("eth0: 1 2 3", "eth0: 1000 20 0 7 0 0 0 0 500 10"))
    assert guest_counters([console])["guest_rx_dropped"] == 7
    console.write_text(stat(100) + stat(250)[:30] + "[ 9.2] a message cuts in\n")
    assert guest_counters([console])["guest_in_echos"] == 100
