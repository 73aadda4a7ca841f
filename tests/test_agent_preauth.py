"""A stranger without the token costs the agent a few KiB at most, for one
handshake deadline, and cannot crowd a real client out.

A real ``netpass agent`` process on loopback; 200 connections that send an
oversized length prefix, deeply nested JSON, or nothing at all; its RSS and
its open fds measured from /proc; a real client, from another address,
authenticates during the attack.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netpass.channel import CONTROL, HELLO, PREFIX, Channel, Wire, _Writer, client_handshake
from netpass.lab.scenario import stop_agent

from .conftest import ROOT

pytestmark = pytest.mark.kernel


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_agent(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, bytes]:
    token = secrets.token_hex(32).encode()
    tokfile = tmp_path / "token"
    tokfile.write_bytes(token)
    tokfile.chmod(0o600)
    port = _free_port()
    agent = subprocess.Popen([sys.executable, "-m", "netpass.cli", "agent", "--listen", f"127.0.0.1:{port}",
                              "--token-file", str(tokfile), "--qmp-root", str(tmp_path),
                              "--state-dir", str(tmp_path / "state")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return agent, port, token


def _wait_listening(agent: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert agent.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.1)


async def _real_client(port: int, token: bytes) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    transport, wire = await loop.create_connection(Wire, "127.0.0.1", port, local_addr=("127.0.0.2", 0))
    ch = Channel(wire, _Writer(transport, wire), peer="agent")  # type: ignore[arg-type]
    try:
        await client_handshake(ch, token)
        await ch.send_json(CONTROL, {"op": "ping"})
        return await ch.recv_json(CONTROL, 10)
    finally:
        await ch.close()


def test_two_hundred_strangers_cost_little_and_a_real_client_gets_in(root_required: None,
                                                                    tmp_path: Path) -> None:
    agent, port, token = _start_agent(tmp_path)
    socks: list[socket.socket] = []
    try:
        _wait_listening(agent, port)
        time.sleep(0.5)
        rss0, fds0 = _rss_kib(agent.pid), _fds(agent.pid)
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            kind = i % 3
            try:
                if kind == 0:  # a prefix claiming 32 MiB, then nothing
                    s.sendall(PREFIX.pack(32 << 20, HELLO))
                elif kind == 1:  # a HELLO of nested JSON (RecursionError in the parser)
                    body = b"[" * 50_000
                    s.sendall(PREFIX.pack(1 + len(body) + 16, HELLO) + body)
                # kind 2: silence
            except OSError:
                pass  # refused already: the agent closed it
            socks.append(s)
        time.sleep(1.0)
        grew_mib = (_rss_kib(agent.pid) - rss0) / 1024
        assert grew_mib < 16, f"the agent's RSS grew {grew_mib:.1f} MiB under the attack"
        answer = asyncio.run(_real_client(port, token))
        assert answer.get("op") == "pong", answer
        # After the handshake deadline (10 s) every stranger's fd is closed.
        deadline = time.monotonic() + 15
        while _fds(agent.pid) > fds0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _fds(agent.pid) <= fds0, f"{_fds(agent.pid) - fds0} fd(s) still open after the deadline"
        assert agent.poll() is None, "the agent died"
    finally:
        for s in socks:
            s.close()
        stop_agent(agent)


def test_a_traversal_session_id_is_refused(root_required: None, tmp_path: Path) -> None:
    """The session id names the hold's state files: ``../..`` or an absolute
    path never becomes one (the agent answers bad_request)."""
    agent, port, token = _start_agent(tmp_path)

    async def attempt(sid: str) -> str:
        from netpass.channel import ChannelError, RemoteError, connect

        ch = await connect(f"127.0.0.1:{port}", token)
        try:
            await ch.send_json(CONTROL, {"op": "open", "session": sid, "dest_qmp": str(tmp_path / "x.qmp"),
                                         "macs": ["52:54:00:12:34:56"]})
            try:
                await ch.recv_json(CONTROL, 10)
            except RemoteError as exc:
                return exc.code
            except ChannelError as exc:
                return str(exc)
            return "accepted"
        finally:
            await ch.close()

    try:
        _wait_listening(agent, port)
        for sid in ("../../outside/x", "/etc/passwd", "ABC", "a" * 65, ""):
            assert asyncio.run(attempt(sid)) == "bad_request", sid
        assert not (tmp_path / "outside").exists()
        assert not list((tmp_path / "state").rglob("*.json")) if (tmp_path / "state").exists() else True
    finally:
        stop_agent(agent)



