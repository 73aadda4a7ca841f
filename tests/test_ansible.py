"""The Ansible role, for real: applied to localhost into a throw-away prefix,
then the agent it rendered serves a lab migration."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .test_lab_netpass import assert_zero_loss, run

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
TOKEN = "e3b7a91f04c6d2584f1a9e0c73d5b26a8c4f1e09b7d3a65f2e8c0b4d91a7f3e6"


def playbook(*args: str, extra: dict[str, Any] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ansible-playbook")
    assert exe, "ansible-playbook is installed by scripts/setup (ansible-core)"
    argv = [exe, "-i", "localhost,", "-c", "local", *args]
    if extra is not None:
        argv += ["-e", json.dumps(extra)]
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(ANSIBLE / "roles"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def recap(out: str) -> dict[str, int]:
    m = re.search(r"localhost\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
    assert m, out[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()), strict=True))


def test_playbooks_parse() -> None:
    for book in ("site.yml", "migrate.yml"):
        res = playbook("--syntax-check", str(ANSIBLE / book), extra={"source": "localhost", "dest": "localhost",
                                                                    "vm": "vm1"})
        assert res.returncode == 0, res.stdout + res.stderr


def pem_pair(where: Path, name: str) -> tuple[str, str]:
    """A self-signed certificate and its key, as PEM texts."""
    key, cert = where / f"{name}-key.pem", where / f"{name}-cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return cert.read_text(), key.read_text()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, root_required: None) -> dict[str, Any]:
    prefix = tmp_path_factory.mktemp("ansible-prefix")
    cert, key = pem_pair(tmp_path_factory.mktemp("tls"), "netpass-agent")
    extra = {"netpass_prefix": str(prefix), "netpass_source": str(ROOT), "netpass_token": TOKEN,
             "netpass_install_system_packages": False, "netpass_manage_service": False,
             "netpass_qmp_root": "/run/netpass-lab", "netpass_listen": "0.0.0.0:7411",
             "netpass_state_dir": str(prefix / "run"),
             "netpass_peers": ["198.19.0.1"], "netpass_metrics_listen": "",
             "netpass_tls_cert": cert, "netpass_tls_key": key, "netpass_tls_ca": cert}
    check = playbook("--check", str(ANSIBLE / "site.yml"), extra=extra)
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-2000:]
    assert list(prefix.iterdir()) == [], "check mode changed something"
    first = playbook(str(ANSIBLE / "site.yml"), extra=extra)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    second = playbook(str(ANSIBLE / "site.yml"), extra=extra)
    assert second.returncode == 0, second.stdout[-4000:]
    return {"prefix": prefix, "first": recap(first.stdout), "second": recap(second.stdout), "extra": extra}


def test_role_renders_everything_and_is_idempotent(installed: dict[str, Any]) -> None:
    prefix: Path = installed["prefix"]
    assert installed["first"]["changed"] > 0 and installed["first"]["failed"] == 0
    assert installed["second"]["changed"] == 0, "a second run changed something"
    token = prefix / "etc/netpass/token"
    assert token.read_text().strip() == TOKEN
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    unit_path = prefix / "etc/systemd/system/netpass-agent.service"
    unit = unit_path.read_text()
    assert f"ExecStart={prefix}/opt/netpass/bin/netpass" in unit and "KillMode=process" in unit
    assert (prefix / "opt/netpass/bin/netpass").exists()
    # TLS on, since a certificate and key were given; the key private.
    assert f"--tls-cert {prefix}/etc/netpass/tls-cert.pem" in unit and "--tls-key" in unit
    assert stat.S_IMODE((prefix / "etc/netpass/tls-key.pem").stat().st_mode) == 0o600
    # Hardened, and systemd accepts every option as written.
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_NET_ADMIN",
                   "SystemCallFilter=@system-service pidfd_getfd bpf", "CAP_BPF", "DeviceAllow=/dev/net/tun rw"):
        assert option in unit, option
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_path)], capture_output=True,
                            text=True, timeout=60)
    complaints = [line for line in verify.stderr.splitlines() if "netpass-agent.service" in line]
    assert complaints == [], verify.stderr
    rules = prefix / "etc/nftables.d/netpass-agent.nft"
    text = rules.read_text()
    assert "ip saddr 198.19.0.1 tcp dport 7411 accept" in text and "tcp dport 7411 drop" in text
    assert subprocess.run(["nft", "-c", "-f", str(rules)], capture_output=True).returncode == 0


def exec_start(prefix: Path) -> list[str]:
    """The unit's ExecStart, with systemd's ${VAR} expansion from its EnvironmentFile."""
    unit = (prefix / "etc/systemd/system/netpass-agent.service").read_text()
    env = dict(line.split("=", 1) for line in (prefix / "etc/netpass/agent.env").read_text().splitlines()
               if line and not line.startswith("#"))
    cmd = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in shlex.split(cmd)]


def test_the_agent_it_set_up_serves_a_migration(installed: dict[str, Any], guest_image, no_leftovers) -> None:
    argv = exec_start(installed["prefix"])
    ca = installed["prefix"] / "etc/netpass/tls-ca.pem"
    res = run(guest_image, "netpass", rate=2000, switchover_pause_ms=200, agent_argv=tuple(argv),
              token_override=TOKEN.encode(), migrate_args=("--tls-ca", str(ca)))
    assert_zero_loss(res)
    assert '"msg": "agent listening' in res["report"]["logs"]["agent"]  # its JSON logs
    assert res["report"]["frames_replayed"] > 0


def test_role_refuses_a_guessable_token_and_a_mismatched_key(installed: dict[str, Any], tmp_path: Path) -> None:
    """The agent's own checks, run by the role before it writes anything."""
    extra = dict(installed["extra"])
    extra["netpass_token"] = "netpass-" * 5  # 40 bytes, few distinct
    res = playbook(str(ANSIBLE / "site.yml"), extra=extra)
    assert res.returncode != 0 and "netpass needs netpass_token" in res.stdout, res.stdout[-3000:]
    extra["netpass_token"] = "0123456789abcdef" * 2  # 32 bytes, guessable
    res = playbook(str(ANSIBLE / "site.yml"), extra=extra)
    assert res.returncode != 0 and "bits at least" in res.stdout, res.stdout[-3000:]
    extra["netpass_token"] = TOKEN
    extra["netpass_tls_key"] = pem_pair(tmp_path, "other")[1]
    res = playbook(str(ANSIBLE / "site.yml"), extra=extra)
    assert res.returncode != 0 and "does not belong to the certificate" in res.stdout, res.stdout[-3000:]
    assert (installed["prefix"] / "etc/netpass/tls-key.pem").read_text() == installed["extra"]["netpass_tls_key"]


def test_role_refuses_a_missing_token(root_required: None) -> None:
    # (root: the play becomes root before its first task, as on a hypervisor)
    res = playbook(str(ANSIBLE / "site.yml"), extra={"netpass_prefix": "/nonexistent-netpass-prefix"})
    assert res.returncode != 0
    assert "netpass needs netpass_token" in res.stdout
    assert not Path("/nonexistent-netpass-prefix").exists()




def test_role_turns_on_the_transparent_mode(installed: dict[str, Any]) -> None:
    """``netpass_libvirt``: the agent follows that libvirt, asks its peers'
    agents, and imports Debian's libvirt binding from its venv."""
    prefix: Path = installed["prefix"]
    extra = dict(installed["extra"], netpass_libvirt="qemu:///system",
                 netpass_libvirt_peers=["198.19.0.1:7411", "198.19.0.3:7411"], netpass_libvirt_strict_ordering=True)
    try:
        res = playbook(str(ANSIBLE / "site.yml"), extra=extra)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        argv = exec_start(prefix)
        assert argv[argv.index("--libvirt") + 1] == "qemu:///system"
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--peer"] == ["198.19.0.1:7411", "198.19.0.3:7411"]
        assert argv[argv.index("--peer-tls-ca") + 1] == f"{prefix}/etc/netpass/tls-ca.pem"
        assert "--strict-ordering" in argv
        unit = (prefix / "etc/systemd/system/netpass-agent.service").read_text()
        assert "After=network-online.target libvirtd.service\n" in unit
        imp = subprocess.run([str(prefix / "opt/netpass/bin/python"), "-c", "import libvirt, libvirt_qemu, libvirtaio"],
                             capture_output=True, text=True, timeout=60)
        assert imp.returncode == 0, imp.stderr
        bad = playbook(str(ANSIBLE / "site.yml"), extra=dict(extra, netpass_libvirt_peers=[]))
        assert bad.returncode != 0 and "netpass_libvirt_peers" in bad.stdout, bad.stdout[-3000:]
    finally:  # (the module's other tests use the QMP agent)
        assert playbook(str(ANSIBLE / "site.yml"), extra=installed["extra"]).returncode == 0
    assert "--libvirt" not in exec_start(prefix)
