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


@pytest.mark.parametrize("size", [64, 1500])
def test_bench_carries_every_frame(root_required: None, size: int) -> None:
    before = set(netns.list_names())
    res = run(size, 3000, verify=True, compress="zstd")
    assert res["frames"] == res["frames_sunk"] == 3000
    assert res["content_ok"]  # every byte, in order
    assert res["frames_per_second"] > 0 and res["raw_drain_fps"] > 0 and 0 < res["ratio_to_raw"]
    assert res["compression_ratio"] > 1.0  # mixed traffic compresses somewhat, not like zeros
    assert res["compression_ratio"] < 10
    assert 0 <= res["latency_p50_ms"] <= res["latency_p99_ms"] < 60_000
    assert res["peak_rss_mib"] > 0
    assert res["frames_dropped"] == {}  # the agent's own checks took every frame
    assert res["session_source_us_per_frame"] > 0 and res["session_source_fps"] > 0
    assert set(netns.list_names()) == before  # its namespaces are gone


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
