"""What this kernel and host support, and what netpass will use here.

Probes that change anything run inside a throw-away namespace that is always
removed, so ``doctor`` leaves the host as it found it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import links, netns, nft, tapfd, tc
from .errors import NetpassError

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = False


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    uses: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks], "uses": self.uses}


def _caps() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_root() -> Check:
    caps = _caps()
    missing = [n for n, b in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_PTRACE", CAP_SYS_PTRACE))
               if not caps & (1 << b)]
    if os.geteuid() == 0 and not missing:
        return Check("root", True, "euid 0 with CAP_NET_ADMIN and CAP_SYS_PTRACE", True)
    why = "not root" if os.geteuid() != 0 else "root"
    return Check("root", False, f"{why}; missing {', '.join(missing) or 'nothing'}: run as root", True)


def check_pidfd_getfd() -> Check:
    """Take an fd from a child we start ourselves, as netpass does from QEMU."""
    child = subprocess.Popen(["sleep", "10"], stdin=subprocess.PIPE)
    try:
        pidfd = tapfd.pidfd_open(child.pid)
        try:
            assert child.stdin is not None
            fd = tapfd.pidfd_getfd(pidfd, 0)
            os.close(fd)
        finally:
            os.close(pidfd)
        scope = "?"
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as fh:
                scope = fh.read().strip()
        except OSError:
            scope = "no yama"
        return Check("pidfd_getfd", True, f"permitted (ptrace_scope {scope})", True)
    except (NetpassError, OSError) as exc:
        return Check("pidfd_getfd", False, str(exc), True)
    finally:
        child.kill()
        child.wait()


def check_tun(ns: str) -> Check:
    try:
        with netns.entered(ns):
            fd = tapfd.open_tap("nptun0", vnet_hdr=True)
        try:
            size = tapfd.vnet_hdr_size(fd)
        finally:
            os.close(fd)
        return Check("tun", True, f"/dev/net/tun works, IFF_VNET_HDR header {size} bytes", True)
    except (NetpassError, OSError) as exc:
        return Check("tun", False, f"{exc}: load the tun module", True)


def check_af_packet() -> Check:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sock.close()
        return Check("af_packet", True, "AF_PACKET sockets open", True)
    except OSError as exc:
        return Check("af_packet", False, f"{exc}", True)


def check_tc_redirect(ns: str) -> Check:
    try:
        tc.add_clsact(ns, "npd-a")
        tc.redirect_all(ns, "npd-a", "npd-c", "ingress")
        tc.redirect_all(ns, "npd-a", "npd-c", "egress")
        return Check("tc_clsact_u32_mirred", True, "clsact with u32 and mirred redirect")
    except NetpassError as exc:
        return Check("tc_clsact_u32_mirred", False, str(exc))


def check_nft(ns: str) -> list[Check]:
    if not nft.available():
        detail = "python3-nftables bindings not importable"
        return [Check("nft_netdev_fwd_dup", False, detail), Check("nft_queue", False, detail)]
    out = []
    try:
        nft.run(ns, "table netdev npdoctor {\n"
                    " chain in { type filter hook ingress device npd-a priority 0; dup to npd-c; fwd to npd-c; }\n"
                    " chain out { type filter hook egress device npd-b priority 0; dup to npd-c; fwd to npd-c; }\n"
                    "}\ndelete table netdev npdoctor\n")
        out.append(Check("nft_netdev_fwd_dup", True, "netdev ingress and egress hooks with fwd and dup"))
    except NetpassError as exc:
        out.append(Check("nft_netdev_fwd_dup", False, str(exc)))
    try:
        nft.run(ns, "table inet npdoctorq {\n"
                    " chain c { type filter hook forward priority 0; queue num 7 bypass; }\n"
                    "}\ndelete table inet npdoctorq\n")
        out.append(Check("nft_queue", True, "nft queue works"))
    except NetpassError as exc:
        out.append(Check("nft_queue", False, f"not in this kernel ({exc})"))
    return out


def check_plug(ns: str) -> Check:
    try:
        tc.add_plug(ns, "npd-b")
        return Check("sch_plug", True, "plug qdisc works")
    except NetpassError as exc:
        return Check("sch_plug", False, f"not in this kernel ({exc})")


def check_strict_hold(ns: str) -> Check:
    """A whole strict-ordering hold, on a throw-away tap: install, hold a
    frame each way, release, remove."""
    import tempfile
    from pathlib import Path

    from . import hold

    try:
        with netns.entered(ns), tempfile.TemporaryDirectory(prefix="npdoctor-") as tmp:
            fd = tapfd.open_tap("npd-t")
            try:
                links.set_up(None, "npd-t")
                h = hold.Hold.install("doctor", "npd-t", Path(tmp), 1 << 20, 1000)
                steered = h.spec.rps_saved is not None
                try:
                    h.close()
                    h.release_all(64, 2)
                finally:
                    h.remove(vm_running=False)
            finally:
                os.close(fd)
        return Check("strict_hold", True, "clsact u32 mirred into ifb devices with a tbf plug; " + (
            "receive steering (RPS) keeps a released burst of the VM's frames in order" if steered else
            "no receive steering (RPS): a released burst of the VM's frames may be reordered across CPUs"))
    except (NetpassError, OSError) as exc:
        return Check("strict_hold", False, f"{exc} (only --strict-ordering needs it)")


def check_queue_pin(ns: str) -> Check:
    """The multiqueue pin (destflow.Holds.pin_queue) on a throw-away 2-queue tap:
    load the steering program, attach it, take it off."""
    try:
        with netns.entered(ns):
            fds = [tapfd.open_tap("npd-q", multi_queue=True) for _ in range(2)]
            try:
                tapfd.steer_to_queue(fds[0], 0)
                tapfd.steer_automatically(fds[0])
            finally:
                for fd in fds:
                    os.close(fd)
        return Check("queue_pin", True, "a tun steering eBPF program attaches and detaches")
    except (NetpassError, OSError) as exc:
        return Check("queue_pin", False, f"{exc} (multiqueue NICs: forwarded frames may then be "
                     "read out of order across queues)")


def check_vhost() -> Check:
    try:
        fd = os.open("/dev/vhost-net", os.O_RDWR)
        os.close(fd)
        return Check("vhost_net", True, "/dev/vhost-net opens (netpass works with vhost=on)")
    except OSError as exc:
        return Check("vhost_net", False, f"/dev/vhost-net: {exc.strerror} (only matters for vhost=on guests)")


def check_qemu() -> Check:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return Check("qemu", False, "qemu-system-x86_64 not found (needed by the lab and on VM hosts)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return Check("qemu", True, out.splitlines()[0] if out else exe)


def check_libvirt(uri: str | None) -> Check:
    """libvirt reachable, with QMP event passthrough (transparent mode)."""
    from . import virt

    target = uri or virt.DEFAULT_URI
    try:
        p = virt.probe(target)
    except NetpassError as exc:
        why = str(exc) if uri else f"{exc} (only matters for migrations libvirt drives; --libvirt URI names another)"
        return Check("libvirt", False, why, required=uri is not None)
    detail = (f"{target}: libvirt {p.libvirt_version}, {p.hypervisor}, {p.domains} domain(s); "
              + ("QMP event passthrough works" if p.passthrough else "QMP event passthrough REFUSED"))
    return Check("libvirt", p.passthrough, detail, required=uri is not None)


def run(libvirt_uri: str | None = None) -> Report:
    rep = Report()
    rep.checks.append(check_root())
    if not rep.checks[0].ok:
        rep.uses = {"capture": "nothing: netpass must run as root"}
        rep.checks.append(check_qemu())
        return rep
    rep.checks.append(check_pidfd_getfd())
    rep.checks.append(check_af_packet())
    ns = f"npdoctor-{os.getpid()}-{secrets.token_hex(2)}"
    netns.create(ns)
    try:
        links.add_veth(ns, "npd-a", ns, "npd-b")
        links.add_veth(ns, "npd-c", ns, "npd-d")
        rep.checks.append(check_tun(ns))
        rep.checks.append(check_tc_redirect(ns))
        rep.checks.extend(check_nft(ns))
        rep.checks.append(check_plug(ns))
        rep.checks.append(check_strict_hold(ns))
        rep.checks.append(check_queue_pin(ns))
    finally:
        for _ in range(3):
            try:
                netns.remove(ns)
                break
            except NetpassError:
                time.sleep(0.1)
    rep.checks.append(check_vhost())
    rep.checks.append(check_qemu())
    rep.checks.append(check_libvirt(libvirt_uri))
    rep.uses = decide(rep)
    return rep


def decide(rep: Report) -> dict[str, str]:
    """Pick the mechanism for each job from what the checks found."""
    def ok(name: str) -> bool:
        c = rep.get(name)
        return bool(c and c.ok)

    uses: dict[str, str] = {}
    uses["capture"] = ("QEMU's tap fd via pidfd_getfd, drained after the stop"
                       if ok("pidfd_getfd") and ok("tun") else "unavailable")
    uses["replay"] = "AF_PACKET with PACKET_VNET_HDR on the destination tap" if ok("af_packet") else "unavailable"
    uses["pin"] = "sticky static FDB entry on the source bridge"
    # nft queue and sch_plug are shown when present; netpass holds with
    # tc + ifb + tbf everywhere (see README, strict ordering).
    if ok("strict_hold"):
        hold = "tc clsact filters steering into ifb devices, a tbf plug on each"
    else:
        hold = "unavailable: --strict-ordering cannot run here"
    uses["hold (strict ordering)"] = hold
    uses["multiqueue order"] = ("every frame toward the VM in queue 0 until the forwarded ones are in "
                                "(tun steering eBPF)" if ok("queue_pin") else
                                "unavailable: multiqueue NICs may see forwarded frames out of order")
    return uses
