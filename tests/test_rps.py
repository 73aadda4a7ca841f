"""The pure parts of receive steering: masks and the kernel's backlog table."""

from __future__ import annotations

from pathlib import Path

import pytest

from netpass import rps

pytestmark = pytest.mark.unit


def test_cpu_masks_both_ways() -> None:
    assert rps.cpu_mask([0, 1]) == "00000003"
    assert rps.cpu_mask([33]) == "00000002,00000000"
    assert rps.mask_cpus("00000002,00000000") == {33}
    assert rps.mask_cpus("3") == {0, 1}
    assert rps.mask_cpus("0") == set()
    for cpus in ([0], [5, 7], [0, 31, 32, 63, 64, 200]):
        assert rps.mask_cpus(rps.cpu_mask(cpus)) == set(cpus)


def test_softnet_backlogs_by_cpu() -> None:
    text = ("0198c8aa 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 "
            "00000000 00000000 00000000 00000000 00000000 00000000\n"
            "01975d92 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
            "00000000 00000000 0000002a 00000003 00000020 0000000a\n")
    assert rps.parse_softnet(text) == {0: 0, 3: 42}
    # A kernel before 5.10 has no backlog column: nothing known, nothing waited for.
    assert rps.parse_softnet("0198c8aa 00000000 00000001 00000000 00000000 00000000 00000000 "
                             "00000000 00000000 00000000 00000000\n") == {}


def test_softnet_drops_are_summed_over_cpus() -> None:
    text = ("0198c8aa 00000259 00000001 00000000\n"
            "01975d92 00000010 00000000 00000000\n")
    assert rps.parse_softnet_dropped(text) == 0x259 + 0x10
    assert rps.parse_softnet_dropped("") == 0


def test_waiting_for_room_in_the_backlogs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The windowed TX release waits for each watched CPU's backlog to be at
    most a number of frames; a kernel that shows no backlogs never makes it
    wait, and a backlog that stays full ends the wait at its bound."""
    seen = iter([{0: 900, 1: 0}, {0: 600, 1: 300}, {0: 200, 1: 900}])
    monkeypatch.setattr(rps, "backlogs", lambda: next(seen))
    assert rps.wait_backlogs_at_most([0], 250, 1.0)  # CPU 1 is not watched
    monkeypatch.setattr(rps, "backlogs", lambda: {})
    assert rps.wait_backlogs_at_most([0, 1], 0, 1.0)
    monkeypatch.setattr(rps, "backlogs", lambda: {0: 1000})
    assert not rps.wait_backlogs_at_most([0], 250, 0.01)


def test_the_backlog_limit_read_or_assumed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "netdev_max_backlog"
    monkeypatch.setattr(rps, "MAX_BACKLOG", path)
    assert rps.max_backlog() == 1000  # unreadable: the kernel's default
    path.write_text("300000\n")
    assert rps.max_backlog() == 300000
    path.write_text("garbage\n")
    assert rps.max_backlog() == 1000
