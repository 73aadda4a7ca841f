"""libvirt in the lab: two private daemons act as two hosts, and a migration
is ``virsh migrate --live`` as an operator types it.

What plain libvirt loses (rate x downtime) is the twin every transparent-mode
test here is measured against: with ``netpass agent --libvirt`` on both
hosts the same migration loses nothing; with one agent missing, or the
source's killed, libvirt's migration goes on unchanged and the agent says
why it kept nothing.  Also ``netpass doctor``'s libvirt check and the
domain's QMP through libvirt, against real daemons.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from netpass.lab import virtlab

from .conftest import run_cli
from .test_lab_netpass import summary

pytestmark = pytest.mark.lab

RATE = 2000


def _why_lost(res: dict[str, Any]) -> str:
    """What a transparent run that lost probes says about where: the lab's
    summary (the guest's counters, the source's report), and the
    destination's report and the tail of its agent's log (the CI keeps
    nothing else).  A string: pytest cuts a dict message short."""
    dst = {k: v for k, v in ((res["reports"].get("dst") or [{}])[-1]).items() if k != "vm"}
    return (f"{summary(res)}\ndestination report: {json.dumps(dst, default=str)}\n"
            f"destination agent log:\n{(res['agent_logs'].get('dst') or '')[-4000:]}")


def test_plain_virsh_migrate_loses_about_rate_times_downtime(guest_image, no_leftovers) -> None:
    res = virtlab.run_plain(guest_image, RATE, lambda m: None)
    assert res["where"] == {"src": None, "dst": "running"}, res["where"]
    assert res["job"].get("Job type") == "Completed", res["job"]
    assert res["dst_guest_fault"] is None
    downtime = res["downtime_ms"]
    assert downtime is not None and downtime > 0, res["job"]
    # The probes sent while QEMU's downtime ran are lost: the paused source
    # never reads them and the LAN still sends them there.
    expected = RATE * downtime / 1000
    assert res["lost"] > 0, str(res)
    assert 0.5 * expected - 5 <= res["lost"] <= 2 * expected + 40, (res["lost"], expected)
    # And lost on the way in: the guest never saw them.
    assert res["sent"] - res["guest_in_echos"] >= res["lost"] - 2, str(res)


def test_doctor_checks_a_real_libvirt(guest_image, no_leftovers) -> None:
    with virtlab.VirtLab(guest_image) as vl:
        out = run_cli("doctor", "--libvirt", vl.src.uri, "--json", timeout=120)
        check = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "libvirt")
        assert check["ok"] and check["required"], check
        assert "QMP event passthrough works" in check["detail"], check
        missing = vl.src.uri.replace("libvirt-sock", "no-such-sock")
    out = run_cli("doctor", "--libvirt", missing, "--json", timeout=120)
    assert out.returncode == 1, out.stdout
    check = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "libvirt")
    assert not check["ok"] and "cannot connect to libvirt" in check["detail"], check
    assert "libvirt: " not in out.stderr, out.stderr  # (the binding's own printing is off)


def test_a_domains_qmp_through_libvirt(guest_image, no_leftovers) -> None:
    """``virt.DomainMonitor``: the calls of netpass's QMP monitor, over
    libvirt's passthrough, during a ``virsh migrate --live``: every status
    of the migration as an event, libvirt's own pre-switchover pause, the
    STOP; commands answered, a refused one a clear error."""
    import asyncio

    from netpass.errors import QMPError
    from netpass.virt import DomainMonitor

    with virtlab.VirtLab(guest_image) as vl:
        vl.start_guest()

        async def follow() -> tuple[list[tuple[str, str | None]], str, str]:
            async with DomainMonitor(vl.src.uri, vl.uuid, "src") as mon:
                status = await mon.status()
                uuid_here = (await mon.execute("query-uuid"))["UUID"]
                try:
                    await mon.execute("no-such-command")
                    raise AssertionError("an unknown command was accepted")
                except QMPError as exc:
                    assert "CommandNotFound" in str(exc), exc
                proc = await asyncio.create_subprocess_exec(*vl.migrate_argv())
                seen: list[tuple[str, str | None]] = []
                async with asyncio.timeout(120):
                    while ("MIGRATION", "completed") not in seen:
                        ev = await mon.next_event(1.0)
                        if ev is not None:
                            seen.append((ev.name, ev.data.get("status")))
                    assert await proc.wait() == 0
                return seen, status, uuid_here

        seen, status, uuid_here = asyncio.run(follow())
    assert status == "running" and uuid_here == vl.uuid
    statuses = [s for name, s in seen if name == "MIGRATION"]
    assert statuses[:2] == ["setup", "active"] and statuses[-1] == "completed", seen
    assert "pre-switchover" in statuses, seen  # libvirt pauses before the switchover, then continues
    stop = seen.index(("STOP", None))
    assert stop < seen.index(("MIGRATION", "completed")), seen


def _libvirt_clean(res: dict) -> None:
    """libvirt's own view: the job completed, the domain runs on the
    destination only, and no taint beyond what netpass's QMP calls imply."""
    assert res["where"] == {"src": None, "dst": "running"}, res["where"]
    assert res["job"].get("Job type") == "Completed", res["job"]
    for host, taints in res["taints"].items():
        assert set(taints) <= {"high-privileges", "custom-monitor"}, (host, taints)
    assert res["dst_guest_fault"] is None
    assert res["src_leftovers"] == [] and res["dst_leftovers"] == [], str(res)


def test_virsh_migrate_with_transparent_agents_loses_nothing(guest_image, no_leftovers) -> None:
    """The operator's ``virsh migrate --live`` unchanged; ``netpass agent
    --libvirt`` on both hosts follows it.  (Plain, the same migration loses
    about rate x downtime: the test above.)"""
    res = virtlab.run(guest_image, RATE, lambda m: None, ("src", "dst"))
    _libvirt_clean(res)
    [rep] = res["reports"]["src"]
    assert rep["state"] == "done" and rep["netpass"], (rep.get("error"), res["agent_logs"]["src"][-3000:])
    assert rep["vm"]["name"] == "netpass-lab-guest" and rep["vm"]["uuid"]
    assert rep["swallowed_account"] == "exact", str(rep)
    assert res["lost"] == 0, _why_lost(res)
    assert rep["frames_captured"] > 0 and rep["frames_replayed"] == rep["frames_captured"], str(rep)
    [dst] = res["reports"]["dst"]  # (each host's agent writes its report)
    assert dst["role"] == "destination" and dst["state"] == "done" and dst["session"] == rep["session"], str(dst)
    assert sum(n["replayed"] for n in dst["nics"]) == rep["frames_replayed"], str(dst)


@pytest.mark.parametrize("present", [("src",), ("dst",)], ids=["no-destination-agent", "no-source-agent"])
def test_an_agent_missing_on_one_side_changes_nothing_and_says_why(guest_image, no_leftovers,
                                                                   present: tuple[str, ...]) -> None:
    """One host runs no agent: the migration goes on as libvirt started it
    (it loses what plain libvirt loses), and the agent that runs says why
    it kept nothing."""
    res = virtlab.run(guest_image, RATE, lambda m: None, present)
    _libvirt_clean(res)
    [rep] = res["reports"][present[0]]
    assert rep["state"] == "not_armed" and rep["netpass"] is False, str(rep)
    if present == ("src",):
        assert rep["role"] == "source" and "no peer agent has the domain incoming" in rep["error"], str(rep)
        assert "cannot reach the agent" in rep["error"], str(rep)
    else:
        assert rep["role"] == "destination" and "no source agent opened a session" in rep["error"], str(rep)
    assert rep["vm"]["name"] == "netpass-lab-guest"
    assert res["lost"] > 0  # (what plain libvirt loses)


def test_a_source_agent_killed_after_its_arm_leaves_libvirts_migration_to_finish(guest_image, no_leftovers) -> None:
    """SIGKILL the source's agent once it is armed, while it holds QEMU back
    (downtime-limit 0, a trickle of bandwidth): its guard gives QEMU the
    operator's values back through libvirt and removes what the agent set
    up, so the migration finishes as a plain one would, in about a second;
    the destination's agent sees its source go and ends its session."""
    res = virtlab.run(guest_image, RATE, lambda m: None, ("src", "dst"), kill_src_agent_at="armed: ")
    assert res["src_agent_killed"], (res["reports"], res["agent_logs"]["src"][-4000:])
    _libvirt_clean(res)  # (no nft table, parking tap or pinned MAC left on the source)
    assert res["migrate_s"] < 30, res["migrate_s"]  # (at 256 KiB/s, 256 MiB of RAM would take minutes)
    [dst] = res["reports"]["dst"]
    assert dst["role"] == "destination" and dst["state"] in ("done", "failed"), str(dst)
