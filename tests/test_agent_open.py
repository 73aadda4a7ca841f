"""The agent's check of an 'open' request (pure: no sockets, no kernel)."""
from __future__ import annotations

from typing import Any

import pytest

from netpass.agent import SessionError, check_open

pytestmark = pytest.mark.unit

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
