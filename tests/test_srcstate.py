"""The source's facts and what they mean (srcstate.py, srcreport.py): fed
facts, no kernel, no QEMU."""

from __future__ import annotations

import json

import pytest

from netpass import srcreport, wire
from netpass.nics import Nic
from netpass.park import Park
from netpass.session import Phase
from netpass.srcstate import MigrateOptions, SourceNic, SourceState

pytestmark = pytest.mark.unit

MAC = "52:54:00:12:34:56"


def _state(queues: int = 1) -> SourceState:
    st = SourceState(MigrateOptions(qmp="q", uri="tcp:x", dest_agent="a", dest_qmp="d", token=b"t"), "s1")
    sn = SourceNic(index=0, nic=Nic(mac=MAC, tap="tap0"), fds=[], hdr_size=12,
                   mac_bytes=bytes.fromhex(MAC.replace(":", "")), park=Park("tap0", "npk0", -1, None),  # type: ignore[arg-type]
                   inject=None, sacrificial=[bytes([q]) * 60 for q in range(queues)])
    st.nics.append(sn)
    return st


def _stopped(st: SourceState, *, parked: float | None, verified: float | None, stop: float) -> None:
    st.parked_t, st.verified_t, st.stop_t = parked, verified, stop
    st.unforeseen = parked is None or parked > stop


def test_a_stop_after_the_verified_park_is_exact() -> None:
    st = _state()
    _stopped(st, parked=st.t0 + 1.0, verified=st.t0 + 1.01, stop=st.t0 + 1.1)
    assert st.stop_path() == "parked"
    assert st.swallowed_account() == "exact"


def test_a_stop_before_the_verification_is_inferred_only_once_every_queue_is_settled() -> None:
    st = _state(queues=2)
    _stopped(st, parked=st.t0 + 1.0, verified=st.t0 + 1.2, stop=st.t0 + 1.1)
    assert st.swallowed_account() == "unknown"  # nothing settled yet
    sn = st.nics[0]
    sn.qemu_held, sn.starved = 0, {0: False}
    assert st.swallowed_account() == "unknown"  # queue 1's guest buffers unknown
    sn.starved[1] = True
    assert st.swallowed_account() == "inferred"
    st.stopped_by_migration = True  # QEMU's own stop may drop a frame nobody can name
    assert st.swallowed_account() == "unknown"


def test_an_unforeseen_stop_is_never_exact() -> None:
    st = _state()
    _stopped(st, parked=None, verified=None, stop=st.t0 + 1.0)
    assert st.stop_path() == "unforeseen"
    assert st.swallowed_account() != "exact"


def test_without_netpass_there_is_no_stop_path_nor_account() -> None:
    st = _state()
    st.netpass_active = False
    _stopped(st, parked=None, verified=None, stop=st.t0 + 1.0)
    assert st.stop_path() is None and st.swallowed_account() is None


def test_the_network_pause_starts_at_the_park_or_at_an_earlier_stop() -> None:
    st = _state()
    _stopped(st, parked=st.t0 + 1.0, verified=st.t0 + 1.01, stop=st.t0 + 1.1)
    assert st.network_pause_ms() is None  # not resumed yet
    st.resumed_t = st.t0 + 1.3
    assert st.network_pause_ms() == pytest.approx(300.0)
    _stopped(st, parked=st.t0 + 1.2, verified=None, stop=st.t0 + 1.1)
    assert st.network_pause_ms() == pytest.approx(200.0)


def test_frames_after_the_resume_are_counted_with_the_last_one_s_lateness() -> None:
    st = _state()
    st.resumed_t = st.t0 + 2.0
    st.cache = [wire.Frame(0, b"", b"x" * 60, us) for us in (1_900_000, 2_010_000, 2_045_500)]
    assert st.after_resume() == (2, 45.5)


def test_an_agent_gone_after_completion_counts_the_unconfirmed_as_lost() -> None:
    st = _state()
    st.nics[0].captured, st.shipped, st.agent_fed, st.agent_duplicates = 100, 90, 70, 5
    st.completed = True
    rep = srcreport.build(st, None, None, cpu_ms=12.34, live_cpu_ms=3.21)
    assert rep["frames_replayed"] == 70
    assert rep["live_cpu_ms"] == 3.2
    assert rep["channel_unsent"] == 10
    assert rep["frames_dropped"] == {"channel_lost": 25}
    assert rep["migrate_cpu_ms"] == 12.3


def test_the_report_merges_the_agent_s_per_nic_counts_and_is_json() -> None:
    st = _state()
    st.nics[0].captured = 10
    st.nics[0].drop("runt")
    st.phases.reach(Phase.ARMED)
    st.dest_report = {"nics": [{"mac": MAC, "replayed": 9, "duplicates_suppressed": 1,
                                "dropped": {"runt": 2, "bad_mac": 1}}],
                      "dest_ring_overflow": 0, "held_rx": 4}
    rep = srcreport.build(st, ValueError("boom"), None, cpu_ms=0.0)
    assert rep["frames_replayed"] == 9 and rep["duplicates_suppressed"] == 1
    assert rep["frames_dropped"] == {"runt": 3, "bad_mac": 1}
    assert rep["nics"][0]["frames_dropped"] == {"runt": 3, "bad_mac": 1}
    assert rep["error_kind"] == "ValueError" and rep["state"] == "armed"
    assert rep["dest_ring_overflow"] == 0 and rep["held_rx"] == 4
    assert rep["states"] == ["armed"]
    json.dumps(rep)


def _frame(src: bytes, n: int, size: int = 64) -> bytes:
    return bytes.fromhex(MAC.replace(":", "")) + src + n.to_bytes(4, "big") * ((size - 12) // 4)


def _hdr(data: bytes) -> bytes:
    return bytes(range(12)) + data  # a virtio-net header of 12 bytes, then the frame


def _taken(bufs: list[bytes], **opts: int) -> tuple[SourceState, list[tuple[bytes, bytes]]]:
    st = _state()
    for k, v in opts.items():
        setattr(st.o, k, v)
    st.take(st.nics[0], bufs, 12, st.t0 + 0.5)
    return st, [(f.vnet_hdr, f.data) for f in st.cache]


def test_a_usual_round_is_taken_whole_in_order_with_its_headers() -> None:
    datas = [_frame(b"\x02" * 6, i) for i in range(300)]
    st, got = _taken([_hdr(d) for d in datas])
    assert got == [(bytes(range(wire.VNET_HDR_LEN)), d) for d in datas]
    assert list(st.outq) == st.cache
    sn = st.nics[0]
    assert (sn.captured, sn.bytes_captured) == (300, 300 * 64)
    assert st.last_frame_t == st.t0 + 0.5 and {f.ts_us for f in st.cache} == {500_000}


def test_an_unusual_round_keeps_the_real_frames_in_order_and_counts_the_rest() -> None:
    real = [_frame(b"\x02" * 6, i) for i in range(5)]
    st0 = _state()
    own = st0.nics[0].sacrificial[0]
    vm_own = _frame(bytes.fromhex(MAC.replace(":", "")), 99)  # the VM's own transmission, flooded back
    runt = real[0][:wire.MIN_FRAME - 1]
    bufs = [_hdr(d) for d in (real[0], own, real[1], vm_own, real[2], runt, real[3], real[4])]
    st, got = _taken(bufs)
    assert [d for _v, d in got] == real
    sn = st.nics[0]
    assert sn.own_seen == {own} and sn.own_frames == 1 and sn.dropped == {"runt": 1}
    assert sn.captured == 5


def test_the_cache_cap_counts_each_frame_s_overhead_and_drops_past_it() -> None:
    from netpass.srcstate import CACHE_FRAME_OVERHEAD

    datas = [_frame(b"\x02" * 6, i) for i in range(10)]
    st, got = _taken([_hdr(d) for d in datas], max_cache_bytes=4 * (64 + CACHE_FRAME_OVERHEAD))
    assert [d for _v, d in got] == datas[:4]
    assert st.nics[0].dropped == {"cache_full": 6}
    assert st.cache_bytes == 4 * (64 + CACHE_FRAME_OVERHEAD)


def test_acks_are_counted_and_a_malformed_message_changes_nothing() -> None:
    st = _state()
    st.unacked[3] = [wire.Frame(0, b"", _frame(b"\x02" * 6, i), 0) for i in range(4)]
    assert st.agent_said(b'{"op":"ack","seq":3,"accepted":4,"dropped":1,"skipped":[1,2],"fed":3}') is None
    assert (st.agent_accepted, st.agent_dropped, st.agent_duplicates, st.agent_fed) == (4, 1, 1, 3)
    assert [f.data[-4:] for f in st.pcap_frames] == [bytes(4), (3).to_bytes(4, "big")]
    assert st.agent_said(b'{"op":"resumed","status":"running"}') == {"op": "resumed", "status": "running"}
    for bad in (b"[1]", b'{"op":"ack","accepted":-1}', b'{"op":"fed","fed":true}', b'{"op":"ack","seq":"x"}',
                b'{"op":"ack","skipped":[null]}', b"\xff"):
        with pytest.raises((ValueError, UnicodeDecodeError)):
            st.agent_said(bad)
    assert (st.agent_accepted, st.agent_dropped, st.agent_fed) == (4, 1, 3)
