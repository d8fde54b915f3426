"""`crdtswarm node` and `crdtswarm doc get|set`, run as a user would, and their errors."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pycrdt
import pytest

from crdtswarm.cli.app import CliError
from crdtswarm.cli.docsync import covers, plain
from crdtswarm.cli.launch import parse_join, parse_listen
from crdtswarm.identity import Identity
from crdtswarm.swarm import Swarm
from crdtswarm.transport.tcp import TcpTransport


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
KEY = str(Identity(bytes(range(32))).public_key)


def start_node(spawn: Spawn, *args: str) -> tuple[Any, str, str]:
    """A node started with ``args``: its process, key and TCP address, once ready."""
    node = spawn("node", *args)
    key = node.field(r"key ")
    address = node.field(r"address tcp://")
    node.expect(r"ready")
    return node, key, address


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on, and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- two nodes, a shared document, a clean stop, a restart ------------------------------------


def test_two_nodes_link_share_a_doc_and_stop_cleanly(spawn: Spawn) -> None:
    first, key1, address1 = start_node(spawn, "--doc", "notes")
    second = spawn("node", "--doc", "notes", "--join", f"{key1}@{address1}")
    key2 = second.field(r"key ")
    address2 = second.field(r"address tcp://")
    second.expect(rf"joined {key1[:8]} {re.escape(address1)}$")
    second.expect(rf"connected {key1[:8]} tcp://")
    first.expect(rf"connected {key2[:8]} tcp://")
    second.expect(r"ready \(1 peer,")

    written = run("doc", "set", "--join", f"{key1}@{address1}", "notes", "greeting", "hello")
    assert written.returncode == 0, written.stderr
    assert written.stdout == f"set notes greeting (acknowledged by {key1[:8]})\n"
    first.expect(r'doc notes: greeting = "hello"$')
    second.expect(r'doc notes: greeting = "hello"$')  # replicated from the first node

    # read through the other node, host:port form of the address
    read = run("doc", "get", "--join", f"{key2}@{address2.removeprefix('tcp://')}", "notes")
    assert read.returncode == 0, read.stderr
    assert read.stdout == '{"greeting": "hello"}\n'

    assert first.stop() == 0
    assert second.stop(signal.SIGINT) == 0  # Ctrl-C
    first.expect(r"stopped: clean shutdown$")
    second.expect(r"stopped: clean shutdown$")
    second.expect(rf"disconnected {key1[:8]} ")
    assert "Traceback" not in "\n".join(first.stderr_lines + second.stderr_lines)


def test_a_node_that_never_opened_the_doc_answers_with_what_the_swarm_holds(
    spawn: Spawn,
) -> None:
    first, key1, address1 = start_node(spawn)  # neither node opens "notes" by itself
    second = spawn("node", "--join", f"{key1}@{address1}")
    key2 = second.field(r"key ")
    address2 = second.field(r"address tcp://")
    second.expect(r"ready \(1 peer,")
    written = run("doc", "set", "--join", f"{key1}@{address1}", "notes", "greeting", "hello")
    assert written.returncode == 0, written.stderr
    # the second node opens "notes" for this command and fetches it from the first
    read = run("doc", "get", "--join", f"{key2}@{address2}", "notes", "greeting")
    assert read.returncode == 0, read.stderr
    assert read.stdout == "hello\n"
    assert first.stop() == 0
    assert second.stop() == 0


def test_a_restarted_node_has_its_key_and_documents(spawn: Spawn, tmp_path: Path) -> None:
    data = tmp_path / "node"
    identity = tmp_path / "node.key"
    node = spawn("node", "--data-dir", str(data), "--identity", str(identity))
    node.expect(rf"identity created {re.escape(str(identity))} \(mode 0600\)$")
    key = node.field(r"key ")
    address = node.field(r"address tcp://")
    node.expect(r"ready")
    assert identity.stat().st_mode & 0o777 == 0o600
    written = run("doc", "set", "--json", "--join", f"{key}@{address}", "todo", "count", "3")
    assert written.returncode == 0, written.stderr
    node.expect(r"doc todo opened \(0 entries\)$")  # opened on the doc command's request
    node.expect(r"doc todo: count = 3$")
    assert node.stop() == 0
    node.expect(rf"stopped: clean shutdown, documents saved in {re.escape(str(data))}$")

    again, key_again, address_again = start_node(
        spawn, "--data-dir", str(data), "--identity", str(identity), "--doc", "todo"
    )
    assert key_again == key
    assert not any(line.startswith("identity created") for line in again.lines)
    again.expect(r"doc todo opened \(1 entry\)$")
    read = run("doc", "get", "--join", f"{key}@{address_again}", "todo", "count")
    assert read.returncode == 0, read.stderr
    assert read.stdout == "3\n"
    assert again.stop() == 0


# -- errors a person can act on: one line, exit status 1 --------------------------------------


def test_a_bad_key_in_join() -> None:
    result = run("node", "--join", "notakey@127.0.0.1:4242")
    assert_one_error_line(result, "--join 'notakey@127.0.0.1:4242': not a public key")


def test_a_key_alone_needs_a_signaling_server() -> None:
    assert_one_error_line(run("node", "--join", KEY), "needs WebRTC and a --signal server")


def test_an_unreachable_signaling_server(free_port: int) -> None:
    result = run("node", "--signal", f"ws://127.0.0.1:{free_port}")
    assert_one_error_line(result, f"signaling server ws://127.0.0.1:{free_port}: unreachable")


def test_a_listen_port_in_use(busy_port: int) -> None:
    result = run("node", "--listen", f"127.0.0.1:{busy_port}")
    assert_one_error_line(result, f"cannot listen on 127.0.0.1:{busy_port}: Address already in use")


def test_a_key_that_is_not_the_nodes_at_that_address(spawn: Spawn) -> None:
    _, key, address = start_node(spawn)
    result = run("node", "--join", f"{KEY}@{address}")
    assert_one_error_line(result, f"has the key {key}, not {KEY[:8]}", "check the key in --join")
    result = run("doc", "get", "--join", f"{KEY}@{address}", "notes")
    assert_one_error_line(result, "check the key in --join")


def test_nobody_at_the_address(free_port: int) -> None:
    result = run("doc", "get", "--join", f"{KEY}@127.0.0.1:{free_port}", "notes")
    assert_one_error_line(result, f"could not join {KEY[:8]}@tcp://127.0.0.1:{free_port}")


def test_a_node_that_does_not_answer_times_out(busy_port: int) -> None:
    address = f"{KEY}@127.0.0.1:{busy_port}"
    result = run("doc", "set", "--timeout", "0.5", "--join", address, "notes", "a", "b")
    assert_one_error_line(result, "timed out after 0.5 s joining")


def test_a_missing_key_in_a_doc(spawn: Spawn) -> None:
    _, key, address = start_node(spawn)
    result = run("doc", "get", "--join", f"{key}@{address}", "notes", "nothing")
    assert_one_error_line(result, "document 'notes' has no key 'nothing'")


def test_identity_files_that_cannot_be_used(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    result = run("doc", "get", "--identity", str(missing), "--join", f"{KEY}@127.0.0.1:1", "n")
    assert_one_error_line(result, f"identity file {missing} does not exist")
    assert not missing.exists()

    shared = tmp_path / "shared.key"
    Identity.generate().save(shared)
    os.chmod(shared, 0o644)
    assert_one_error_line(run("node", "--identity", str(shared)), "chmod 600")

    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello\n")
    os.chmod(garbage, 0o600)
    assert_one_error_line(run("node", "--identity", str(garbage)), "malformed line")

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    nowhere = a_file / "dir" / "node.key"  # missing directories are created, not this one
    assert_one_error_line(run("node", "--identity", str(nowhere)), "Not a directory")


def test_a_damaged_data_directory(tmp_path: Path) -> None:
    (tmp_path / "docs.sqlite3").write_bytes(b"not a database" * 100)
    result = run("node", "--data-dir", str(tmp_path))
    assert_one_error_line(result, f"data directory {tmp_path}: cannot open the document store")


async def test_a_node_that_does_not_serve_doc_commands() -> None:
    async with Swarm(transports=[TcpTransport()]) as library_node:
        target = f"{library_node.public_key}@{library_node.addresses[0]}"
        done = await anyio.run_process(
            [*helpers.COMMAND, "doc", "get", "--join", target, "notes"], check=False
        )
    result = subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )
    assert_one_error_line(result, "does not serve doc commands (not a 'crdtswarm node')")


# -- the pieces, without processes -------------------------------------------------------------


def test_join_values() -> None:
    assert parse_join(KEY).address is None
    assert parse_join(f"{KEY}@127.0.0.1:4242").address == "tcp://127.0.0.1:4242"
    assert parse_join(f"{KEY}@tcp://[::1]:4242").address == "tcp://[::1]:4242"
    assert str(parse_join(f"{KEY}@h:1")) == f"{KEY[:8]}@tcp://h:1"
    assert parse_join(f"{KEY}@webrtc://{KEY}").address is None  # a node's webrtc line
    other = Identity.generate().public_key
    for bad in (
        f"{KEY[:-1]}x@h:1",
        f"{KEY}@h",
        f"{KEY}@h:0",
        f"{KEY}@h:99999",
        "@h:1",
        f"{KEY}@webrtc://{other}",
    ):
        with pytest.raises(CliError):
            parse_join(bad)


def test_a_node_on_every_interface_prints_addresses_others_can_call(spawn: Spawn) -> None:
    node = spawn("node", "--no-webrtc", "--listen", "0.0.0.0:0")
    first = node.field(r"address tcp://")
    node.expect(r"ready ")
    assert not first.startswith("tcp://0.0.0.0")
    assert node.stop() == 0


def test_announced_addresses_are_printed_and_checked(spawn: Spawn) -> None:
    node = spawn("node", "--no-webrtc", "--announce", "203.0.113.5:4242")
    assert node.field(r"address ") == "tcp://203.0.113.5:4242"
    assert node.stop() == 0
    result = run("node", "--announce", "nonsense")
    assert result.returncode == 1
    assert "--announce 'nonsense'" in result.stderr


def test_a_private_swarm_needs_its_swarm_key(spawn: Spawn) -> None:
    made = run("key", "swarm")
    assert made.returncode == 0
    swarm_key = made.stdout.strip()
    assert len(bytes.fromhex(swarm_key)) == 32
    assert run("key", "swarm").stdout.strip() != swarm_key  # random each time
    node, key, address = start_node(spawn, "--no-webrtc", "--swarm-key", swarm_key)
    target = f"{key}@{address}"
    written = run("doc", "set", "--swarm-key", swarm_key, "--join", target, "notes", "a", "b")
    assert written.returncode == 0, written.stderr
    assert_one_error_line(
        run("doc", "get", "--join", target, "notes"), "wrong or missing swarm key"
    )
    other = run("key", "swarm").stdout.strip()
    assert_one_error_line(
        run("doc", "get", "--swarm-key", other, "--join", target, "notes"),
        "wrong or missing swarm key",
    )
    assert_one_error_line(
        run("doc", "get", "--swarm-key", "abc", "--join", target, "notes"), "64 hex digits"
    )
    assert node.stop() == 0


def test_listen_values() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("0.0.0.0:4242") == ("0.0.0.0", 4242)
    assert parse_listen("[::1]:4242") == ("::1", 4242)
    for bad in ("4242", "::1:4242", "host:", ":4242", "host:65536", "host:x"):
        with pytest.raises(CliError):
            parse_listen(bad)


def test_state_vectors_and_values() -> None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    empty = doc.get_state()
    doc.get("data", type=pycrdt.Map)["a"] = 1
    later = doc.get_state()
    assert covers(later, empty)
    assert covers(later, later)
    assert not covers(empty, later)
    assert plain(doc.get("data", type=pycrdt.Map)["a"]) == 1
    assert plain({"n": [1.0, 2.5, "x"]}) == {"n": [1, 2.5, "x"]}
