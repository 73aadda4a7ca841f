"""netpass bench: that it measures the real path correctly (not how fast it is)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netpass import netns
from netpass.bench import VM_MAC, mixed_frames, run
from netpass.errors import LabError


def test_mixed_frames_look_like_traffic() -> None:
    frames = mixed_frames(500, 600)
    assert all(f[:6] == VM_MAC and f[12:14] == b"\x08\x00" for f in frames)
    assert 500 <= sum(len(f) for f in frames) / 500 <= 700
    assert len(set(frames)) == 500  # not repeated bytes


@pytest.mark.parametrize("size,free_source", [(64, False), (1500, False), (1500, True)])
def test_bench_carries_every_frame(root_required: None, size: int, free_source: bool) -> None:
    before = set(netns.list_names())
    res = run(size, 3000, verify=True, compress="zstd", free_source=free_source)
    assert res["free_source"] is free_source
    assert res["frames"] == res["frames_sunk"] == 3000
    assert res["content_ok"]  # every byte, in order
    assert res["frames_per_second"] > 0 and res["raw_drain_fps"] > 0 and 0 < res["ratio_to_raw"]
    assert res["compression_ratio"] > 1.0  # mixed traffic compresses somewhat, not like zeros
    assert res["compression_ratio"] < 10
    assert 0 <= res["latency_p50_ms"] <= res["latency_p99_ms"] < 60_000
    assert res["peak_rss_mib"] > 0
    assert res["frames_dropped"] == {}  # the agent's own checks took every frame
    assert res["session_source_us_per_frame"] > 0 and res["session_source_fps"] > 0
    cpu = res["cpu_us_per_frame"]
    assert cpu["total"] == pytest.approx(cpu["source"] + cpu["receiver"] + cpu["sink"], abs=0.02)
    # The cores cannot carry more than the CPU the three processes spent
    # allows (10% for the edges of their CPU windows, which are not the clock's).
    assert 0 < res["frames_per_second"] <= 1.1 * res["cpu_bound_fps"]
    assert res["cpu_bound_ratio"] == pytest.approx(res["cpu_bound_fps"] / res["raw_drain_fps"], rel=0.01)
    assert set(netns.list_names()) == before  # its namespaces are gone


def test_cpu_bound_is_the_cores_over_the_cpu_per_frame() -> None:
    from netpass.bench import cpu_bound

    # 4 us of CPU a frame on 2 cores: 500,000 frames/s at most, 0.5 of a 1,000,000 read loop.
    assert cpu_bound(4e-6, 1_000_000.0, cpus=2) == {"cpus": 2, "cpu_bound_fps": 500_000,
                                                    "cpu_bound_ratio": 0.5}
    assert cpu_bound(0.0, 1_000_000.0, cpus=2)["cpu_bound_fps"] is None  # nothing measured
    assert cpu_bound(4e-6, 0.0, cpus=2)["cpu_bound_ratio"] is None
    assert cpu_bound(4e-6, 1.0)["cpus"] >= 1  # this process's own CPUs


def test_cache_cap_bench_fills_past_the_cap(root_required: None) -> None:
    from netpass.bench import cache_cap

    res = cache_cap(32, 64)
    assert res["cap_holds"] and res["cached_mib"] <= 32
    assert res["dropped_cache_full"] > 0  # it did offer more than the cap
    assert res["frames_cached"] + res["dropped_cache_full"] == res["frames_offered"]
    assert res["peak_rss_mib"] > res["rss_before_mib"]


@pytest.mark.parametrize("count", [0, 500_001])
def test_bench_refuses_a_run_one_tap_cannot_hold(count: int) -> None:
    with pytest.raises(LabError, match="--frames is 1 to 500,000"):
        run(64, count)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 600)), min_size=1, max_size=40),
       st.sampled_from([0.0, 0.5, 0.99]))
def test_weighted_percentile_matches_the_per_frame_list(weighted: list[tuple[int, int]], q: float) -> None:
    from netpass.bench import _percentile

    flat = sorted(v for v, n in weighted for _ in range(n))
    assert _percentile(weighted, q) == flat[int(len(flat) * q)] / 1000


def test_weighted_percentile_of_nothing() -> None:
    from netpass.bench import _percentile

    assert _percentile([], 0.5) is None


def test_medians_of_runs() -> None:
    from netpass.bench import medians

    runs = [{"fps": 3, "ratio": 0.5, "cpu": {"src": 1.0}, "compress": "auto", "cap": True, "d": {}},
            {"fps": 1, "ratio": 0.7, "cpu": {"src": 3.0}, "compress": "auto", "cap": False, "d": {}},
            {"fps": 2, "ratio": 0.6, "cpu": {"src": 2.0}, "compress": "auto", "cap": True, "d": {}}]
    assert medians(runs) == {"fps": 2, "ratio": 0.6, "cpu": {"src": 2.0}, "compress": "auto",
                             "cap": [True, False, True], "d": {}}


@pytest.mark.parametrize("size", [64, 1500])
def test_live_bench_offers_the_rate_and_the_shadow_keeps_its_tail(root_required: None, size: int) -> None:
    """``bench --live``: the rate is offered, netpass's CPU is counted, and
    the shadow ring kept the newest offered frames in order (checked frame
    by frame against what the sender sent), none dropped at this pace."""
    from netpass import livebench

    before = set(netns.list_names())
    res = livebench.run(size, 0.5, rates=(20_000,))
    assert 18_000 <= res["live_offered_fps_20k"] <= 22_000
    assert res["live_refused_20k"] == 0
    assert res["live_us_per_frame_20k"] > 0
    assert res["live_shadow_dropped_20k"] == 0
    assert res["live_shadow_kept_20k"] > 100 and res["live_shadow_tail_ok_20k"] is True
    assert set(netns.list_names()) == before


def test_live_bench_refuses_bad_arguments() -> None:
    from netpass import livebench

    with pytest.raises(LabError, match="--seconds is 0.2 to 60"):
        livebench.run(64, 0.1)
    with pytest.raises(LabError, match="--size is a frame size"):
        livebench.run(40, 1.0)


def test_perf_control_writes_to_the_fifo_perf_reads(tmp_path) -> None:
    import os

    from netpass.bench import perf_control

    fifo = tmp_path / "ctl"
    os.mkfifo(fifo)
    with pytest.raises(LabError, match="no perf reads it"):
        perf_control(str(fifo), "enable")  # nobody has it open for reading
    rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        perf_control(str(fifo), "enable")
        perf_control(str(fifo), "disable")
        assert os.read(rd, 100) == b"enable\ndisable\n"
    finally:
        os.close(rd)
    perf_control(None, "enable")  # no FIFO: nothing to tell

