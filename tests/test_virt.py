"""What netpass reads from libvirt, as pure functions: a domain's NICs from
its XML, QEMU's run state from libvirt's (state, reason)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from netpass.endgame import Endgame
from netpass.virt import domain_interfaces, qemu_status

pytestmark = pytest.mark.unit

XML = """<domain type='qemu'><name>web1</name><devices>
  <interface type='bridge'><mac address='52:54:00:AA:BB:CC'/><source bridge='br0'/>
    <target dev='vnet3'/><model type='virtio'/></interface>
  <interface type='user'><mac address='52:54:00:00:00:01'/><model type='e1000'/></interface>
  <interface type='ethernet'><mac address='52:54:00:00:00:02'/><target dev='tap9'/></interface>
</devices></domain>"""

# libvirt's own values (libvirt-domain.h)
LV = SimpleNamespace(VIR_DOMAIN_RUNNING=1, VIR_DOMAIN_PAUSED=3, VIR_DOMAIN_SHUTOFF=5, VIR_DOMAIN_CRASHED=6,
                     VIR_DOMAIN_PMSUSPENDED=7, VIR_DOMAIN_PAUSED_USER=1, VIR_DOMAIN_PAUSED_MIGRATION=2,
                     VIR_DOMAIN_PAUSED_STARTING_UP=11)


def test_nics_come_from_the_domain_xml_with_their_taps() -> None:
    assert domain_interfaces(XML) == [("52:54:00:aa:bb:cc", "vnet3", "virtio"), ("52:54:00:00:00:02", "tap9", "?")]


@pytest.mark.parametrize("state,reason,incoming,want", [
    (1, 1, False, "running"),
    (3, 1, False, "paused"),
    (3, 2, True, "inmigrate"),  # the receiving host, during the migration
    (3, 11, True, "inmigrate"),  # ... and until libvirt's Finish resumes it
    (3, 2, False, "postmigrate"),  # the sending host, after its stop
    (5, 0, False, "shutdown"),
    (6, 0, False, "guest-panicked"),
])
def test_qemu_status_from_libvirt_state(state: int, reason: int, incoming: bool, want: str) -> None:
    assert qemu_status(LV, state, reason, incoming) == want  # type: ignore[arg-type]


def test_libvirts_unlimited_bandwidth_is_no_limit_to_the_endgame() -> None:
    """libvirt sets max-bandwidth to about 8 EiB/s: taken as a limit, its
    window's reach made the zero-run rule throttle at the first zero pages."""
    assert Endgame(9223372036853727232).max_bandwidth == 0
    assert Endgame(128 << 20).max_bandwidth == 128 << 20
