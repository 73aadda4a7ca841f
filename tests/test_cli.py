"""The command line: arguments, exit codes, errors that say what to fix."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from netpass.lab.topology import leftovers

from .conftest import ROOT, run_cli


@pytest.mark.parametrize("args,needle", [
    (["demo", "--rate", "0"], "--rate must be positive"),
    (["demo", "--rate", "fast"], "--rate must be a number"),
    (["demo", "--pause-ms", "-5"], "--pause-ms must be zero or more"),
    (["demo", "--mode", "turbo"], "invalid choice"),
    (["nosuch"], "invalid choice"),
    (["bench", "--repeat", "0"], "--repeat must be positive"),
    (["bench", "--size", "-1"], "--size must be positive"),
])
def test_bad_arguments(args: list[str], needle: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    assert needle in res.stderr


def test_bench_perf_control_wants_a_fifo(root_required: None, tmp_path: Path) -> None:
    plain = tmp_path / "ctl"
    plain.write_text("")
    res = run_cli("bench", "--perf-control", str(plain))
    assert res.returncode == 2 and "is not a FIFO" in res.stderr and "mkfifo" in res.stderr
    res = run_cli("bench", "--live", "--perf-control", str(plain))
    assert res.returncode == 2 and "not --live" in res.stderr
    res = run_cli("bench", "--cache-cap-mib", "8", "--free-source")
    assert res.returncode == 2 and "--free-source is for the transfer bench" in res.stderr


def test_version() -> None:
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("netpass ")


def _others_can_run_us() -> bool:
    """Whether user nobody can reach this checkout and its Python."""
    for path in (ROOT, Path(sys.executable).resolve()):
        for parent in [path, *path.parents]:
            if parent.is_dir() and not parent.stat().st_mode & stat.S_IXOTH:
                return False
    return True


def _as_nobody(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
               *args: str) -> tuple[int, str, str]:
    """Run the CLI as user nobody for real where possible, else in-process
    with the effective uid reported as nobody's."""
    if _others_can_run_us() and not os.environ.get("NETPASS_TEST_INPROCESS"):
        res = run_cli(*args, user="65534")
        return res.returncode, res.stdout, res.stderr
    from netpass import cli, doctor

    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    monkeypatch.setattr(doctor, "_caps", lambda: 0)
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_demo_without_root_says_so(root_required: None, monkeypatch, capsys) -> None:
    rc, _out, err = _as_nobody(monkeypatch, capsys, "demo")
    assert rc == 77, err
    assert "needs root" in err and "sudo" in err


def test_doctor_without_root_fails_clearly(root_required: None, monkeypatch, capsys) -> None:
    rc, out, _err = _as_nobody(monkeypatch, capsys, "doctor", "--json")
    assert rc == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert data["checks"][0]["name"] == "root" and not data["checks"][0]["ok"]


def test_doctor_json_as_root(root_required: None) -> None:
    before = set(leftovers())
    res = run_cli("doctor", "--json")
    data = json.loads(res.stdout)
    names = {c["name"] for c in data["checks"]}
    assert {"root", "pidfd_getfd", "tun", "tc_clsact_u32_mirred", "nft_netdev_fwd_dup",
            "nft_queue", "sch_plug", "vhost_net", "qemu"} <= names
    assert res.returncode == (0 if data["ok"] else 1)
    assert data["ok"], data  # this host must be able to run netpass
    assert "hold (strict ordering)" in data["uses"]
    # the probes run in a throw-away namespace that is gone afterwards
    assert not [n for n in os.listdir("/run/netns") if n.startswith("npdoctor-")]
    assert set(leftovers()) == before


def test_doctor_table(root_required: None) -> None:
    res = run_cli("doctor")
    assert res.returncode == 0
    assert "pidfd_getfd" in res.stdout and "capture" in res.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token(tmp_path: Path) -> Path:
    tok = tmp_path / "token"
    tok.write_text("4be1f07c93a25d68e0c1b7f42a9d53e6c08f1b2a7d64e9c3f05a8b1d2e7c4f96")
    tok.chmod(0o600)
    return tok


def test_migrate_argument_errors(root_required: None, tmp_path: Path) -> None:
    base = ["migrate", "--qmp", "/nonexistent.qmp", "--uri", "tcp:127.0.0.1:1",
            "--dest-qmp", "/run/x.qmp"]
    res = run_cli(*base, "--dest-agent", "127.0.0.1:1", "--token-file", str(tmp_path / "none"))
    assert res.returncode == 2 and "cannot read token file" in res.stderr
    res = run_cli(*base, "--dest-agent", "not-a-hostport", "--token-file", str(_token(tmp_path)))
    assert res.returncode == 2 and "HOST:PORT" in res.stderr
    res = run_cli(*base, "--dest-agent", "127.0.0.1:1", "--token-file", str(_token(tmp_path)))
    assert res.returncode == 1 and "cannot reach the agent" in res.stderr


def test_migrate_missing_qmp_socket_and_agent_cli(root_required: None, tmp_path: Path) -> None:
    import subprocess
    import time

    port = _free_port()
    tok = _token(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    agent = subprocess.Popen([sys.executable, "-m", "netpass.cli", "agent", "--listen",
                              f"127.0.0.1:{port}", "--token-file", str(tok), "--qmp-root", str(tmp_path)],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            import socket

            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        res = run_cli("migrate", "--qmp", str(tmp_path / "absent.qmp"), "--uri", "tcp:127.0.0.1:1",
                      "--dest-agent", f"127.0.0.1:{port}", "--dest-qmp", str(tmp_path / "d.qmp"),
                      "--token-file", str(tok))
        assert res.returncode == 1, res.stderr
        assert "QMP socket" in res.stderr and "absent.qmp" in res.stderr
    finally:
        agent.terminate()
        agent.wait(10)
    assert "agent listening" in agent.stderr.read()  # type: ignore[union-attr]


def test_agent_argument_errors(root_required: None, tmp_path: Path) -> None:
    res = run_cli("agent", "--listen", "127.0.0.1:1", "--token-file", str(_token(tmp_path)),
                  "--qmp-root", str(tmp_path / "nodir"))
    assert res.returncode == 2 and "not a directory" in res.stderr
    res = run_cli("agent", "--listen", "127.0.0.1:1", "--token-file", str(_token(tmp_path)),
                  "--tls-cert", "x.pem")
    assert res.returncode == 2 and "go together" in res.stderr
    res = run_cli("agent", "--listen", "127.0.0.1:1", "--token-file", str(_token(tmp_path)),
                  "--qmp-root", str(tmp_path), "--peer", "198.18.0.2:7411")
    assert res.returncode == 2 and "go with --libvirt" in res.stderr, res.stderr
    res = run_cli("agent", "--listen", "127.0.0.1:1", "--token-file", str(_token(tmp_path)),
                  "--libvirt", "qemu:///system", "--peer", "no-port")
    assert res.returncode == 2 and "HOST:PORT" in res.stderr


def test_json_log_lines_carry_the_session() -> None:
    import json
    import logging

    from netpass.cli import JsonFormatter

    rec = logging.LogRecord("netpass.agent", logging.INFO, __file__, 1, "session=%s hold closed on %s",
                            ("ab12cd34ef56", "tap0"), None)
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["session"] == "ab12cd34ef56" and obj["msg"] == "hold closed on tap0"
    assert obj["level"] == "info" and obj["logger"] == "netpass.agent" and obj["ts"].endswith("+00:00")
    plain = json.loads(JsonFormatter().format(logging.LogRecord("x", logging.WARNING, __file__, 1, "no id", (), None)))
    assert "session" not in plain and plain["msg"] == "no id"
