"""The agent's check of an 'open' request (pure: no sockets, no kernel)."""
from __future__ import annotations

from typing import Any

import pytest

from netpass.agent import SessionError, check_open

GOOD: dict[str, Any] = {"op": "open", "session": "ab" * 8, "dest_qmp": "/run/q.sock",
                        "macs": ["52:54:00:12:34:56"], "resume": True,
                        "vm": {"uuid": "3F2504E0-4F89-11D3-9A0C-0305E82C3301", "name": "web1"}}


def test_good_request_is_normalised() -> None:
    path, macs, vm = check_open(GOOD)
    assert path == "/run/q.sock"
    assert macs == ["52:54:00:12:34:56"]
    assert vm == {"uuid": "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "name": "web1"}


def test_vm_is_optional() -> None:
    req = {k: v for k, v in GOOD.items() if k != "vm"}
    assert check_open(req)[2] == {}


@pytest.mark.parametrize("field,value,words", [
    ("dest_qmp", None, "dest_qmp"),
    ("dest_qmp", "", "dest_qmp"),
    ("dest_qmp", "/a\0b", "dest_qmp"),
    ("dest_qmp", 7, "dest_qmp"),
    ("macs", [], "macs"),
    ("macs", "52:54:00:12:34:56", "macs"),
    ("macs", ["52:54:00:12:34"], "macs"),
    ("macs", [1], "macs"),
    ("macs", ["52:54:00:12:34:56"] * 65, "macs"),
    ("vm", [], "vm"),
    ("vm", {"uuid": 5}, "vm"),
    ("vm", {"uuid": "not-a-uuid"}, "vm.uuid"),
    ("vm", {"name": "x" * 300}, "vm.name"),
    ("resume", "yes", "resume"),
    ("strict", 3, "strict"),
])
def test_bad_fields_are_named(field: str, value: Any, words: str) -> None:
    req = dict(GOOD)
    req[field] = value
    with pytest.raises(SessionError) as exc:
        check_open(req)
    assert words in str(exc.value)


@pytest.fixture
def qmp_dir(root_required: None):  # type: ignore[no-untyped-def]
    """A directory outside /tmp (world-writable) with a listening socket in it."""
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="netpass-qmp-test-", dir="/run"))
    os_sock = socket.socket(socket.AF_UNIX)
    os_sock.bind(str(base / "vm.qmp"))
    os_sock.listen()
    try:
        yield base
    finally:
        os_sock.close()
        shutil.rmtree(base)


def test_qmp_socket_checks(qmp_dir) -> None:  # type: ignore[no-untyped-def]
    import os

    from netpass.agent import check_qmp_socket

    sock = str(qmp_dir / "vm.qmp")
    root_only = frozenset({0})
    assert check_qmp_socket(sock, qmp_dir, root_only) == sock
    (qmp_dir / "plain").write_text("x")
    for path, root, uids, code in (
            ("/etc/passwd", qmp_dir, root_only, "qmp_root"),
            (str(qmp_dir / "nothere.qmp"), qmp_dir, root_only, "qmp"),
            (str(qmp_dir / "plain"), qmp_dir, root_only, "qmp"),
            (sock, qmp_dir, frozenset({4242}), "qmp_owner")):
        with pytest.raises(SessionError) as exc:
            check_qmp_socket(path, root, uids)
        assert exc.value.code == code, (path, exc.value)
    os.chown(sock, 4243, 4243)
    with pytest.raises(SessionError) as exc:
        check_qmp_socket(sock, qmp_dir, root_only)
    assert exc.value.code == "qmp_owner" and "4243" in str(exc.value)
    assert check_qmp_socket(sock, qmp_dir, frozenset({0, 4243})) == sock
    os.chmod(qmp_dir, 0o777)
    with pytest.raises(SessionError) as exc:
        check_qmp_socket(sock, qmp_dir, frozenset({0, 4243}))
    assert exc.value.code == "qmp_path" and "world-writable" in str(exc.value)


def test_an_incoming_libvirt_domain_is_named_by_its_uuid() -> None:
    """Transparent mode: the source's agent names the incoming domain by its
    UUID (never a path: the agent then asks its own libvirt)."""
    from netpass.agent import LIBVIRT_PREFIX

    req = {k: v for k, v in GOOD.items() if k != "dest_qmp"}
    req["libvirt_uuid"] = "3F2504E0-4F89-11D3-9A0C-0305E82C3301"
    assert check_open(req)[0] == LIBVIRT_PREFIX + "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    for bad in ("../etc", 7, None):
        with pytest.raises(SessionError, match="libvirt_uuid"):
            check_open({**req, "libvirt_uuid": bad})
    with pytest.raises(SessionError, match="without dest_qmp"):
        check_open({**req, "dest_qmp": "/run/q.sock"})
    # A QMP path cannot pass for a domain and skip the socket checks.
    with pytest.raises(SessionError, match="not a libvirt domain"):
        check_open({**GOOD, "dest_qmp": LIBVIRT_PREFIX + "3f2504e0-4f89-11d3-9a0c-0305e82c3301"})
