"""Fixtures for the hostile-network tests: a small internet in network namespaces.

``internet`` (one per module): the public namespace with coturn (STUN + TURN over UDP
and TCP) and the rendezvous, see topology.py. ``site`` (per test): ``site("a", kind)``
adds a NAT router and a host behind it, removed after the test. ``nodes`` (per test):
``nodes.spawn(site, "a", ice_servers)`` starts node_app.py (raw aiortc) and
``nodes.spawn_swarm(site, "a", ice_servers, signaling=...)`` starts swarm_app.py (a
crdtswarm Swarm) in the site's host namespace; both give a `Node` handle to send it
commands and await its events. ``signaling`` (per test): crdtswarm's
`SignalingServer` (signaling_app.py) in the public namespace, ``.url`` to pass to
nodes, ``await .kill()`` to make it vanish mid-test.

Everything is torn down in finalizers, failed test or not: node processes are asked
to quit then killed, coturn, the rendezvous and the signaling server stopped,
namespaces deleted. When a test fails, the node and service logs and the NAT rules
are printed with its report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
from anyio import to_thread
from anyio.abc import Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

HERE = Path(__file__).resolve().parent
NODE_APP = HERE / "node_app.py"
SWARM_APP = HERE / "swarm_app.py"
SIGNALING_APP = HERE / "signaling_app.py"
SIGNALING_PORT = 8765
MAX_LINE = 1 << 20


def _load(name: str) -> Any:
    """Import a sibling helper module (tests are not packages under --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"_crdtswarm_netns_{name}", HERE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


topology = _load("topology")


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return request.node.stash.get(_FAILED, False)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<{exc}>"


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason, iptables = topology.missing_prerequisite()
    if reason is not None:
        pytest.skip(reason)
    net = topology.Internet(iptables=iptables)
    log_dir = tmp_path_factory.mktemp(f"netns-{net.tag}")
    try:
        net.create()
        net.start_services(log_dir, sys.executable, HERE / "rendezvous.py")
        yield net
    finally:
        net.close()


@pytest.fixture
def site(internet: Any, request: pytest.FixtureRequest) -> Iterator[Callable[[str, str], Any]]:
    created: list[str] = []

    def make(name: str, kind: str) -> Any:
        created.append(name)
        return internet.add_site(name, kind)

    try:
        yield make
    finally:
        if _failed(request):
            for name in created:
                if name in internet.sites:
                    print(f"--- NAT rules of site {name} ---\n{internet.sites[name].nat_rules()}")
            for service in internet.services:
                print(f"--- {service.name} log (tail) ---\n{_tail(service.log_path)}")
        for name in created:
            if name in internet.sites:
                internet.remove_site(name)


class Node:
    """A node_app.py process: send it commands, await its JSON events with deadlines.

    A reader task collects every event as it is printed (so the pipe never fills up);
    `expect` hands out each event at most once, `seen` looks at all of them.
    """

    def __init__(self, name: str, process: Process, log_path: Path, log: IO[str]) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self._log = log
        self.events: list[dict[str, Any]] = []  # every event, in order
        self._taken: set[int] = set()  # indexes of events returned by expect()
        self._new_event = anyio.Event()
        self._eof = False

    async def read_events(self) -> None:
        assert self.process.stdout is not None
        stdout = BufferedByteReceiveStream(self.process.stdout)
        try:
            while True:
                line = await stdout.receive_until(b"\n", MAX_LINE)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "garbage", "line": line.decode(errors="replace")}
                self.events.append(event)
                self._new_event.set()
                self._new_event = anyio.Event()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            pass
        finally:
            self._eof = True
            self._new_event.set()

    async def command(self, cmd: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")

    def seen(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if _matches(e, event, match)]

    async def expect(
        self, event: str, timeout: float, *, fail_on: tuple[str, ...] = (), **match: Any
    ) -> dict[str, Any]:
        """The first event not yet expected named ``event`` whose fields include ``match``.

        Fails at once if a ``fail_on`` event (with the same ``match``) comes first, and
        after ``timeout`` seconds if none comes.
        """
        with anyio.move_on_after(timeout):
            while True:
                for i, e in enumerate(self.events):
                    if i in self._taken:
                        continue
                    if _matches(e, event, match):
                        self._taken.add(i)
                        return e
                    if any(_matches(e, f, match) for f in fail_on):
                        self._taken.add(i)
                        raise AssertionError(f"node {self.name}: {e} instead of {event!r}")
                if self._eof:
                    raise AssertionError(
                        f"node {self.name} exited; events: {self.summary()}\n"
                        f"stderr:\n{_tail(self.log_path)}"
                    )
                await self._new_event.wait()
        raise AssertionError(
            f"node {self.name}: no {event!r} {match} within {timeout} s; events: {self.summary()}"
        )

    def summary(self) -> str:
        keep = ("event", "peer", "reason", "candidate_type", "t")
        return json.dumps([{k: e[k] for k in keep if k in e} for e in self.events])

    async def stop(self) -> None:
        """Ask the node to quit; kill it if it does not within a few seconds."""
        if self.process.returncode is None:
            with anyio.move_on_after(10):
                with contextlib.suppress(
                    anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                ):
                    await self.command("quit")
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
        await self.process.aclose()
        self._log.close()


class Nodes:
    """Starts node processes in site namespaces and stops them all at teardown."""

    def __init__(self, internet: Any, log_dir: Path, task_group: TaskGroup) -> None:
        self.internet = internet
        self.log_dir = log_dir
        self.task_group = task_group
        self.started: list[Node] = []

    async def spawn(
        self,
        site: Any,
        name: str,
        ice_servers: list[dict[str, str]],
        *,
        heartbeat: tuple[float, float] = (1.0, 5.0),
        debug: bool = False,
    ) -> Node:
        """Start a node in ``site``'s host namespace; `ready` waits until it answers."""
        interval, timeout = heartbeat
        argv = site.host.argv(
            sys.executable,
            str(NODE_APP),
            "--name", name,
            "--rendezvous", self.internet.rendezvous,
            "--ice-servers", json.dumps(ice_servers),
            "--heartbeat-interval", str(interval),
            "--heartbeat-timeout", str(timeout),
        )  # fmt: skip
        if debug:
            argv.append("--debug")
        return await self._start(name, argv)

    async def spawn_swarm(
        self,
        site: Any,
        name: str,
        ice_servers: list[dict[str, str]],
        *,
        signaling: tuple[str, ...] = (),
        tcp: str | None = None,
        keepalive: tuple[float, float] = (1.0, 5.0),
        dial_timeout: float = 10.0,
        connect_timeout: float = 20.0,
        mesh: dict[str, float] | None = None,
        debug: bool = False,
    ) -> Node:
        """Start a swarm_app.py node in ``site``'s host namespace (see that module)."""
        interval, timeout = keepalive
        argv = site.host.argv(
            sys.executable,
            str(SWARM_APP),
            "--name", name,
            "--ice-servers", json.dumps(ice_servers),
            "--keepalive-interval", str(interval),
            "--peer-timeout", str(timeout),
            "--dial-timeout", str(dial_timeout),
            "--connect-timeout", str(connect_timeout),
            "--mesh", json.dumps(mesh or {}),
            "--doc", "notes",
        )  # fmt: skip
        for url in signaling:
            argv += ["--signaling", url]
        if tcp is not None:
            argv += ["--tcp", tcp]
        if debug:
            argv.append("--debug")
        return await self._start(name, argv)

    async def _start(self, name: str, argv: list[str]) -> Node:
        log_path = self.log_dir / f"node-{name}.log"
        log = log_path.open("w")
        process = await anyio.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
        node = Node(name, process, log_path, log)
        self.started.append(node)
        self.task_group.start_soon(node.read_events)
        return node

    async def ready(self, timeout: float = 20.0) -> None:
        """Wait until every spawned node is up (registered at its rendezvous or server)."""
        for node in self.started:
            if not node.seen("ready"):
                await node.expect("ready", timeout)

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for node in self.started:
                tg.start_soon(node.stop)


@pytest.fixture
async def nodes(
    internet: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Nodes]:
    async with anyio.create_task_group() as tg:
        pool = Nodes(internet, tmp_path, tg)
        try:
            yield pool
        finally:
            with anyio.CancelScope(shield=True):
                await pool.stop_all()
            if _failed(request):
                for node in pool.started:
                    print(f"--- node {node.name} events ---\n{node.summary()}")
                    print(f"--- node {node.name} stderr (tail) ---\n{_tail(node.log_path)}")


class Signaling:
    """crdtswarm's signaling server (signaling_app.py) running in the public namespace."""

    def __init__(self, service: Any, url: str) -> None:
        self.service = service
        self.url = url

    async def kill(self) -> None:
        """The server vanishes (SIGKILL): its clients see their connections drop."""
        self.service.proc.kill()
        await to_thread.run_sync(self.service.proc.wait, 5)


@pytest.fixture
def signaling(internet: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Signaling]:
    argv = [sys.executable, str(SIGNALING_APP), "--host", topology.SERVICE_IP,
            "--port", str(SIGNALING_PORT)]  # fmt: skip
    service = topology.start_service(internet.public, "signaling", argv, tmp_path)
    try:
        line = service.reader.wait_for(lambda line: '"ready"' in line, timeout=20)
        yield Signaling(service, json.loads(line)["url"])
    finally:
        service.stop()
        if _failed(request):
            print(f"--- signaling server log (tail) ---\n{_tail(service.log_path)}")


def _matches(e: dict[str, Any], event: str, match: dict[str, Any]) -> bool:
    return e.get("event") == event and all(e.get(k) == v for k, v in match.items())
