"""`crdtswarm signal-server`, and nodes that join by key alone through it over WebRTC."""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _load(name: str) -> Any:
    """Import a sibling helper module (tests are not packages under --import-mode=importlib)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_crdtswarm_cli_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


helpers = _load("cli_process")
run = helpers.run
assert_one_error_line = helpers.assert_one_error_line
spawn = helpers.spawn  # the fixture

Spawn = Callable[..., Any]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_it_prints_its_url_and_stops_cleanly_on_sigterm(spawn: Spawn) -> None:
    server = spawn("signal-server", "--port", "0", "--max-connections", "8")
    url = server.field(r"url ws://127\.0\.0\.1:\d+$")
    assert server.stop() == 0
    server.expect(r"stopped: clean shutdown \(0 signals forwarded, 0 connections closed\)$")
    assert server.lines == [f"url {url}", server.lines[-1]]
    assert server.stderr_lines == []


def test_two_nodes_join_by_key_over_webrtc_through_it(spawn: Spawn) -> None:
    server = spawn("signal-server", "--port", "0")
    url = server.field(r"url ")
    first = spawn("node", "--signal", url, "--doc", "notes")
    key1 = first.field(r"key ")
    first.expect(rf"signaling {re.escape(url)}$")
    first.expect(r"ready")
    second = spawn("node", "--signal", url, "--join", key1, "--join-timeout", "15")
    key2 = second.field(r"key ")
    second.expect(rf"joined {key1[:8]} by key$")
    second.expect(rf"connected {key1[:8]} webrtc://{key1}$")
    first.expect(rf"connected {key2[:8]} webrtc://{key2}$")

    # a doc command reaches the first node by key alone too
    written = run("doc", "set", "--signal", url, "--join", key1, "notes", "via", "webrtc")
    assert written.returncode == 0, written.stderr
    first.expect(r'doc notes: via = "webrtc"$')

    assert second.stop() == 0
    assert first.stop() == 0
    second.expect(r"stopped: clean shutdown$")
    first.expect(r"stopped: clean shutdown$")
    assert server.stop() == 0
    server.expect(r"stopped: clean shutdown \([1-9]\d* signals forwarded")


def test_a_port_in_use(busy_port: int) -> None:
    result = run("signal-server", "--port", str(busy_port))
    assert_one_error_line(result, f"cannot listen on 127.0.0.1:{busy_port}: Address already in use")


def test_limits_that_contradict_each_other() -> None:
    result = run("signal-server", "--max-signal-size", "1000", "--max-queued-bytes", "100")
    assert_one_error_line(result, "bad limits: max-queued-bytes must hold at least one signal")


def test_a_url_that_is_not_a_signaling_server(spawn: Spawn) -> None:
    node = spawn("node")
    address = node.field(r"address tcp://")
    node.expect(r"ready")
    # a crdtswarm node's TCP port speaks Noise, not WebSocket
    url = address.replace("tcp://", "ws://")
    result = run("node", "--signal", url, "--signal-timeout", "3")
    assert_one_error_line(result, f"signaling server {url}: ")
    result = run("node", "--signal", "http://127.0.0.1:1")
    assert_one_error_line(result, "not a WebSocket URL")
