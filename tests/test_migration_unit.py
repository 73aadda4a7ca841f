"""Unit tests for the pure parts of the migration driver and QMP wrapper."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from netpass.errors import NetpassError, QMPError
from netpass.migration import progress_line
from netpass.qmp import Event, Monitor, peer_pid


def test_progress_line_picks_operator_fields() -> None:
    info = {"status": "active", "expected-downtime": 12,
            "ram": {"transferred": 3 * 2**20, "remaining": 2**20, "total": 256 * 2**20,
                    "dirty-pages-rate": 5, "dirty-sync-count": 2}}
    assert progress_line(info) == {"status": "active", "transferred_mib": 3.0,
                                   "remaining_mib": 1.0, "total_mib": 256.0,
                                   "dirty_pages_rate": 5, "pass": 2, "expected_downtime_ms": 12}


def test_event_emitted_time_is_not_after_receipt() -> None:
    ev = Event.from_msg({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}})
    assert ev.emitted <= ev.received and ev.name == "STOP"


def test_missing_qmp_socket_says_what_to_fix(tmp_path: Path) -> None:
    mon = Monitor(str(tmp_path / "nope.qmp"))
    with pytest.raises(QMPError, match="does not exist"):
        asyncio.run(mon.connect())
    assert issubclass(QMPError, NetpassError)


def test_silent_qmp_socket_times_out_with_hint(tmp_path: Path) -> None:
    path = tmp_path / "busy.qmp"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    try:
        with pytest.raises(QMPError, match="one client at a time"):
            asyncio.run(Monitor(str(path), timeout=0.5).connect())
    finally:
        srv.close()


def test_peer_pid_of_our_own_socket(tmp_path: Path) -> None:
    import os

    path = tmp_path / "me.qmp"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    try:
        assert peer_pid(str(path)) == os.getpid()
    finally:
        srv.close()
    with pytest.raises(QMPError):
        peer_pid(str(tmp_path / "absent.qmp"))
