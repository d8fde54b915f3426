"""How fast, and at what byte cost, does an edit reach every replica of a swarm?

Two questions, measured in the same run:

1. Convergence on the simulated network (``crdtswarm.testing.SimulatedNetwork``,
   in-process). ``N`` Swarm nodes (default 10, 50, 200), every pair of nodes with
   its own one-way latency drawn uniformly from 5-40 ms (seeded), default
   ``SwarmConfig`` otherwise (``max_peers`` 8, ``batch_interval`` 5 ms) except
   that keepalives are stretched (``keepalive_interval`` 120 s) and directory
   entries made long-lived (``member_ttl`` and ``latency_ttl`` 1 h), so that no
   ping or directory refresh falls into a measured window (and no entry expires by
   the wall clock while the simulated one barely moves). Each node calls one random earlier node;
   the benchmark waits, event-driven, until every directory lists all ``N``
   members and the mesh is stable (each node has ``max_peers`` to
   ``1.5 * max_peers`` links, links are symmetric, the link graph is connected,
   then one second without a link or member event). Every node has the document
   ``"bench"`` open. Then edits (one map set each) are made one after the other at
   random nodes. For each edit:

   * time: from the edit until the last replica applies it (each node's doc
     observer notes when it fires), next to its floor: the latency of the shortest
     path over the links that are up (Dijkstra on the latencies set) from the
     editing node to the node farthest from it. The floor leaves out batching: a
     hop may add up to ``batch_interval``, so the hop count of that path is shown;
   * bytes: every message the network carries (tap) from the edit until the
     network has been quiet for 250 ms, divided by ``N - 1``, next to its floor,
     one copy of the encoded Yjs update per node. The ratio includes the Noise
     (16-byte tag, length), mux and sync framing (document name, message type,
     4-byte origin) around each copy. Updates travel along the shortest-path tree
     of the edit's origin, computed from the latency rows every node publishes in
     the directory (``crdtswarm.sync.replica``, rule 3), so with settled rows each
     node receives one copy; ``msgs/node`` above 1 means some updates fell back
     to flooding (rows not yet settled everywhere).

   Every node lives in this one process, so the CPU work of all ``N`` nodes
   (Noise, mux, pycrdt, asyncio) is serialised on one core, where in a real swarm
   each node has its own. Each swarm is therefore measured with two clocks on the
   same mesh: ``sim``, the event loop's clock jumping over idle waits (CPU work
   takes no time: what remains is the network's latency and the library's own
   waits, the quantity the floor bounds; the setup runs on this clock too), then
   ``wall``, the real clock (all ``N`` nodes' CPU counts). ``cpu/node`` is the
   process CPU time from the edit to the last message it caused, divided by
   ``N``. The bytes of an idle second before the edits are reported to show the
   measured windows are clean. The mesh's own random choices (whom to link to)
   are not seedable, so the link graph varies between runs; the latencies,
   identities and editors do not.

2. Sync throughput between two nodes over loopback TCP, next to
   pycrdt-websocket: node A makes ``--updates`` small updates to ``"bench"`` (one
   map set per transaction) and we time until node B's document holds all of
   them. crdtswarm: two Swarm nodes linked directly over ``TcpTransport``.
   pycrdt-websocket: its ``WebsocketServer`` behind its ``ASGIServer`` on hypercorn,
   and two ``pycrdt.Provider`` clients connected with httpx-ws (A -> server room
   -> B, the way that library is deployed). Everything in one process and one
   event loop. Two ways of writing: ``burst`` (all updates in one synchronous
   loop, so a library may merge them) and ``paced`` (the writer yields to the
   event loop after every update, as an interactive application would).

Run: ``python -m benchmarks.convergence [--nodes 10 50 200] [--quick]``. Prints a
table, one JSON line per result, and writes ``benchmarks/results/convergence.json``.
The comparison needs ``pycrdt-websocket``, ``hypercorn`` and ``httpx-ws``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import json
import platform
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pycrdt

from crdtswarm import Identity, PublicKey, Swarm, SwarmConfig
from crdtswarm.mesh import MeshConfig
from crdtswarm.sync.directory import DirectoryConfig
from crdtswarm.sync.replica import ReplicaConfig
from crdtswarm.testing import SimulatedNetwork
from crdtswarm.transport.tcp import TcpTransport

if TYPE_CHECKING:
    import selectors
    from collections.abc import Callable

    from anyio.abc import TaskStatus

RESULTS = Path(__file__).resolve().parent / "results"
DOC = "bench"
MIN_LATENCY, MAX_LATENCY = 0.005, 0.040
QUIET = 0.25  # seconds without a message that end an update's byte count
SETTLE_QUIET = 1.0  # seconds without a link or member event that end the setup
SETTLE_TIMEOUT = 900.0
EDIT_TIMEOUT = 60.0


# -- an event loop with a simulated clock ------------------------------------------------


class _JumpingSelector:
    """Wraps the loop's selector: while the clock is simulated, an idle wait jumps it."""

    def __init__(self, selector: selectors.BaseSelector, loop: SimClockLoop) -> None:
        self._selector = selector
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if not self._loop.simulated:
            return self._selector.select(timeout)
        events = self._selector.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled: only I/O can wake us
            return self._selector.select(None)
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


class SimClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock is simulated (it jumps to the next timer whenever
    nothing is ready to run, so CPU work takes no time) until `use_real_clock`."""

    def __init__(self) -> None:
        super().__init__()
        self.simulated = True
        self._now = 0.0
        self._offset = 0.0
        self._selector: Any = _JumpingSelector(self._selector, self)

    def time(self) -> float:
        return self._now if self.simulated else time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def use_real_clock(self) -> None:
        """From now on the clock is real (and continues from the simulated time)."""
        if self.simulated:
            self._offset = self._now - time.monotonic()
            self.simulated = False


# -- the simulated swarm -----------------------------------------------------------------


def sim_config(batch_interval: float, max_peers: int) -> SwarmConfig:
    return SwarmConfig(
        keepalive_interval=120.0,
        peer_timeout=600.0,
        replica=ReplicaConfig(batch_interval=batch_interval),
        directory=DirectoryConfig(member_ttl=3600.0, latency_ttl=3600.0),
        mesh=MeshConfig(max_peers=max_peers),
        probe=None,  # like the stretched keepalives: no ping inside a measured window
    )


def identity(seed: int, index: int) -> Identity:
    return Identity(hashlib.sha256(f"convergence:{seed}:{index}".encode()).digest())


@dataclass
class EditResult:
    time: float
    floor: float
    direct_floor: float
    hops: int
    bytes: int
    messages: int
    update_size: int
    cpu: float


@dataclass
class SwarmRun:
    n: int
    links: int
    setup_wall: float
    setup_sim: float
    idle_bytes: int
    edits: dict[str, list[EditResult]] = field(default_factory=dict)


@dataclass
class Probe:
    """Notes, for the edit in flight, when each node's doc first changes."""

    seen: dict[int, float] = field(default_factory=dict)
    expected: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)
    update_size: int = 0
    editor: int = -1

    def reset(self, editor: int, expected: int) -> None:
        self.seen = {}
        self.expected = expected
        self.done = anyio.Event()
        self.update_size = 0
        self.editor = editor

    def observer(self, index: int) -> Callable[[Any], None]:
        def changed(event: Any) -> None:
            if index == self.editor:
                self.update_size = len(event.update)
            elif index not in self.seen:
                self.seen[index] = anyio.current_time()
                if len(self.seen) == self.expected:
                    self.done.set()

        return changed


def link_graph(nodes: list[Swarm], net: SimulatedNetwork) -> list[list[tuple[int, float]]]:
    """Per node, its linked nodes and the one-way latency to each."""
    index = {node.public_key: i for i, node in enumerate(nodes)}
    return [
        [(index[key], net.latency(node.public_key, key)) for key in node.peers] for node in nodes
    ]


def farthest(graph: list[list[tuple[int, float]]], source: int) -> tuple[float, int]:
    """Dijkstra from ``source``: (distance to the farthest node, hops on that path)."""
    dist = {source: 0.0}
    hops = {source: 0}
    queue = [(0.0, source)]
    while queue:
        d, i = heapq.heappop(queue)
        if d > dist[i]:
            continue
        for j, w in graph[i]:
            if d + w < dist.get(j, float("inf")):
                dist[j] = d + w
                hops[j] = hops[i] + 1
                heapq.heappush(queue, (d + w, j))
    if len(dist) < len(graph):
        return float("inf"), 0
    far = max(dist, key=lambda i: dist[i])
    return dist[far], hops[far]


def mesh_settled(nodes: list[Swarm], max_peers: int) -> bool:
    """Every directory lists everyone; links are symmetric, within bounds, connected."""
    n = len(nodes)
    everyone = {node.public_key for node in nodes}
    low = min(max_peers, n - 1)
    high = max_peers + max(1, max_peers // 2)
    links: dict[PublicKey, set[PublicKey]] = {}
    for node in nodes:
        peers = links[node.public_key] = set(node.peers)
        if not low <= len(peers) <= high:
            return False
    for key, peers in links.items():
        if any(key not in links[peer] for peer in peers):
            return False
    reached, todo = {nodes[0].public_key}, [nodes[0].public_key]
    while todo:
        for peer in links[todo.pop()] - reached:
            reached.add(peer)
            todo.append(peer)
    return len(reached) == n and all(node.members == everyone for node in nodes)


async def settle(nodes: list[Swarm], condition: Callable[[], bool], quiet: float) -> None:
    """Wait until ``condition()`` holds and no node reports an event for ``quiet`` seconds.

    Re-checks after every burst (50 ms) of link and member events of any node (and,
    for state changes without an event, at least every second).
    """
    send, receive = anyio.create_memory_object_stream[object](1_000_000)

    async def forward(node: Swarm) -> None:
        events = node.events()
        try:
            async for event in events:
                with contextlib.suppress(anyio.WouldBlock):
                    send.send_nowait(event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    with send, receive, anyio.fail_after(SETTLE_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for node in nodes:
                tg.start_soon(forward, node)
            while True:
                if condition():
                    with anyio.move_on_after(quiet) as scope:
                        await receive.receive()
                    if scope.cancelled_caught:
                        break
                else:
                    with anyio.move_on_after(1.0):
                        await receive.receive()
                    await anyio.sleep(0.05)  # events come in bursts: look once per burst
                while True:  # take the whole batch of events before looking again
                    try:
                        receive.receive_nowait()
                    except anyio.WouldBlock:
                        break
            tg.cancel_scope.cancel()


class Counter:
    """Counts every message the network carries (a tap), and notes the CPU time of the last."""

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0
        self.cpu = 0.0

    def __call__(self, src: PublicKey, dst: PublicKey, data: bytes) -> None:
        self.bytes += len(data)
        self.messages += 1
        self.cpu = time.process_time()


async def run_swarm(
    n: int, edits: dict[str, int], seed: int, batch_interval: float, max_peers: int
) -> SwarmRun:
    """Build and settle an ``n``-node swarm, then time ``edits[clock]`` edits per clock."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, SimClockLoop), "run me with loop_factory=SimClockLoop"
    rng = random.Random(f"{seed}:{n}")
    net = SimulatedNetwork(seed=seed)
    identities = [identity(seed, i) for i in range(n)]
    keys = [ident.public_key for ident in identities]
    for i in range(n):
        for j in range(i + 1, n):
            net.set_latency(keys[i], keys[j], rng.uniform(MIN_LATENCY, MAX_LATENCY))
    counter = Counter()
    net.tap(counter)
    probe = Probe()
    config = sim_config(batch_interval, max_peers)
    stop = anyio.Event()

    async def host(node: Swarm, *, task_status: TaskStatus[None]) -> None:
        try:
            async with node:
                task_status.started()
                await stop.wait()
        except* RuntimeError as group:
            # A known crdtswarm shutdown race, after the measurements: while a node
            # closes, its mesh may start a dial on its already stopped transport.
            # Anything else is re-raised.
            race, rest = group.split(
                lambda e: isinstance(e, RuntimeError) and "started before dial" in str(e)
            )
            if rest is not None:
                raise rest from None
            print(f"warning: {node.public_key.short} closing: {race!r}", file=sys.stderr)

    wall0, sim0 = time.perf_counter(), anyio.current_time()
    async with anyio.create_task_group() as hosts:  # the nodes close in parallel at the end
        nodes = [Swarm(ident, [net.transport()], config=config) for ident in identities]
        for i, node in enumerate(nodes):
            await hosts.start(host, node)
            node.doc(DOC).observe(probe.observer(i))
        try:
            async with anyio.create_task_group() as tg:
                for i in range(1, n):
                    tg.start_soon(partial(nodes[i].call, keys[rng.randrange(i)], timeout=60.0))
            await settle(nodes, lambda: mesh_settled(nodes, max_peers), SETTLE_QUIET)
            setup_wall, setup_sim = time.perf_counter() - wall0, anyio.current_time() - sim0
            idle_from = counter.bytes
            await anyio.sleep(1.0)
            run = SwarmRun(
                n=n,
                links=sum(len(node.peers) for node in nodes) // 2,
                setup_wall=setup_wall,
                setup_sim=setup_sim,
                idle_bytes=counter.bytes - idle_from,
            )
            for clock, count in edits.items():
                if clock == "wall":
                    loop.use_real_clock()
                run.edits[clock] = [
                    await measure_edit(nodes, net, probe, counter, rng.randrange(n), f"{clock}{k}")
                    for k in range(count)
                ]
        finally:
            stop.set()
    return run


async def measure_edit(
    nodes: list[Swarm],
    net: SimulatedNetwork,
    probe: Probe,
    counter: Counter,
    editor: int,
    label: str,
) -> EditResult:
    """One map set at ``nodes[editor]``; its time to every replica and the bytes it cost."""
    floor, hops = farthest(link_graph(nodes, net), editor)
    source = nodes[editor].public_key
    direct = max(
        net.latency(source, node.public_key) for node in nodes if node is not nodes[editor]
    )
    probe.reset(editor, len(nodes) - 1)
    bytes0, messages0, cpu0 = counter.bytes, counter.messages, time.process_time()
    start = anyio.current_time()
    nodes[editor].doc(DOC).get("m", type=pycrdt.Map)[label] = 1
    with anyio.fail_after(EDIT_TIMEOUT):
        await probe.done.wait()
    elapsed = max(probe.seen.values()) - start
    while True:  # count until the network has been quiet for QUIET seconds
        last = counter.bytes
        await anyio.sleep(QUIET)
        if counter.bytes == last:
            break
    return EditResult(
        time=elapsed,
        floor=floor,
        direct_floor=direct,
        hops=hops,
        bytes=counter.bytes - bytes0,
        messages=counter.messages - messages0,
        update_size=probe.update_size,
        cpu=counter.cpu - cpu0,
    )


# -- two nodes over TCP ------------------------------------------------------------------


async def write_updates(doc: pycrdt.Doc[Any], count: int, paced: bool) -> None:
    ymap = doc.get("m", type=pycrdt.Map)
    for i in range(count):
        ymap[f"k{i}"] = i  # one transaction each
        if paced:
            await anyio.lowlevel.checkpoint()


async def wait_for_count(doc: pycrdt.Doc[Any], count: int) -> None:
    """Wait until ``doc``'s map ``m`` holds ``count`` keys (re-checked on every change)."""
    changed = anyio.Event()

    def on_change(_event: Any) -> None:
        changed.set()

    ymap = doc.get("m", type=pycrdt.Map)
    subscription = doc.observe(on_change)
    try:
        with anyio.fail_after(300.0):
            while len(ymap) < count:
                await changed.wait()
                changed = anyio.Event()
    finally:
        doc.unobserve(subscription)


async def timed_sync(
    doc_a: pycrdt.Doc[Any], doc_b: pycrdt.Doc[Any], count: int, paced: bool
) -> float:
    """Updates/s from ``doc_a``'s first update until ``doc_b`` has all ``count``."""
    doc_a.get("m", type=pycrdt.Map)["ready"] = -1  # both sides are in sync before timing
    await wait_for_count(doc_b, 1)
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_count, doc_b, count + 1)
        await write_updates(doc_a, count, paced)
    return count / (time.perf_counter() - start)


async def tcp_crdtswarm(count: int, paced: bool) -> float:
    async with (
        Swarm(transports=[TcpTransport()]) as a,
        Swarm(transports=[TcpTransport()]) as b,
    ):
        doc_a, doc_b = a.doc(DOC), b.doc(DOC)
        await a.call(b.public_key, b.addresses[0])
        return await timed_sync(doc_a, doc_b, count, paced)


async def tcp_pycrdt_websocket(count: int, paced: bool) -> float:
    try:
        from httpx_ws import aconnect_ws
        from hypercorn import Config
        from hypercorn.asyncio import serve
        from pycrdt import Provider
        from pycrdt.websocket import ASGIServer, WebsocketServer
        from pycrdt.websocket.websocket import HttpxWebsocket
    except ImportError as exc:
        raise SystemExit(
            f"the comparison needs pycrdt-websocket, hypercorn and httpx-ws: {exc}"
        ) from exc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    stop = anyio.Event()
    server = WebsocketServer(auto_clean_rooms=False)
    app: Any = ASGIServer(server)
    async with server, anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait))
        with anyio.fail_after(10.0):
            while True:
                try:
                    probe = await anyio.connect_tcp("127.0.0.1", port)
                except OSError:
                    await anyio.sleep(0.01)
                    continue
                await probe.aclose()
                break
        url = f"http://127.0.0.1:{port}/{DOC}"
        doc_a: pycrdt.Doc[Any] = pycrdt.Doc()
        doc_b: pycrdt.Doc[Any] = pycrdt.Doc()
        connect_a: Any = aconnect_ws(url)
        connect_b: Any = aconnect_ws(url)
        async with (
            connect_a as ws_a,
            Provider(doc_a, HttpxWebsocket(ws_a, DOC)),
            connect_b as ws_b,
            Provider(doc_b, HttpxWebsocket(ws_b, DOC)),
        ):
            rate = await timed_sync(doc_a, doc_b, count, paced)
        stop.set()
    return rate


# -- report ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--edits", type=int, default=20, help="edits per swarm, per clock")
    parser.add_argument(
        "--wall-edits-200", type=int, default=10, help="wall-clock edits when N >= 200 (slow)"
    )
    parser.add_argument("--updates", type=int, default=10_000, help="updates in the TCP part")
    parser.add_argument("--runs", type=int, default=3, help="runs per throughput figure")
    parser.add_argument("--batch-interval", type=float, default=ReplicaConfig().batch_interval)
    parser.add_argument("--max-peers", type=int, default=MeshConfig().max_peers)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.edits, args.updates, args.runs = [5, 10], 3, 500, 1

    results: list[dict[str, Any]] = []

    def record(name: str, value: float, unit: str, **extra: Any) -> None:
        row = {"name": name, "value": round(value, 3), "unit": unit, **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    table: list[tuple[int, str, SwarmRun, dict[str, float]]] = []
    for n in args.nodes:
        edits = {"sim": args.edits, "wall": args.edits if n < 200 else args.wall_edits_200}
        run = anyio.run(
            run_swarm,
            n,
            edits,
            args.seed,
            args.batch_interval,
            args.max_peers,
            backend_options={"loop_factory": SimClockLoop},
        )
        record(
            "swarm_setup",
            run.setup_wall,
            "s",
            n=n,
            links=run.links,
            sim_seconds=round(run.setup_sim, 2),
            idle_bytes_per_s=run.idle_bytes,
        )
        for clock, done in run.edits.items():
            times = [e.time * 1000 for e in done]
            ratios = [e.time / e.floor for e in done]
            stats = {
                "time": statistics.median(times),
                "floor": statistics.median(e.floor * 1000 for e in done),
                "hops": statistics.median(e.hops for e in done),
                "ratio": statistics.median(ratios),
                "max_ratio": max(ratios),
                "bytes": statistics.median(e.bytes / (n - 1) for e in done),
                "size": statistics.median(e.update_size for e in done),
                "bytes_ratio": statistics.median(e.bytes / ((n - 1) * e.update_size) for e in done),
                "messages": statistics.median(e.messages / (n - 1) for e in done),
                "cpu": statistics.median(e.cpu / n * 1000 for e in done),
            }
            common = {"n": n, "clock": clock, "edits": len(done), "links": run.links}
            record(
                "convergence_time" if clock == "sim" else "convergence_time_wall",
                stats["time"],
                "ms",
                **common,
                p90_ms=round(percentile(times, 0.9), 1),
                max_ms=round(max(times), 1),
                floor_ms=round(stats["floor"], 1),
                direct_floor_ms=round(statistics.median(e.direct_floor * 1000 for e in done), 1),
                hops=stats["hops"],
                ratio_vs_floor=round(stats["ratio"], 3),
                max_ratio_vs_floor=round(stats["max_ratio"], 3),
                batch_interval_ms=args.batch_interval * 1000,
                cpu_ms_per_node=round(stats["cpu"], 3),
            )
            if clock == "sim":
                record(
                    "convergence_bytes_per_node",
                    stats["bytes"],
                    "B",
                    **common,
                    floor_bytes=stats["size"],
                    ratio_vs_floor=round(stats["bytes_ratio"], 3),
                    messages_per_node=round(stats["messages"], 2),
                )
            table.append((n, clock, run, stats))

    tcp: dict[tuple[str, str], float] = {}
    for mode in ("burst", "paced"):
        ours, theirs = [], []
        for _ in range(args.runs):  # interleaved so that machine noise hits both alike
            ours.append(anyio.run(tcp_crdtswarm, args.updates, mode == "paced"))
            theirs.append(anyio.run(tcp_pycrdt_websocket, args.updates, mode == "paced"))
        tcp["crdtswarm", mode] = statistics.median(ours)
        tcp["pycrdt_websocket", mode] = statistics.median(theirs)
        ratio = tcp["crdtswarm", mode] / tcp["pycrdt_websocket", mode]
        record(
            "pycrdt_websocket_sync",
            tcp["pycrdt_websocket", mode],
            "updates/s",
            mode=mode,
            updates=args.updates,
            runs=[round(r) for r in theirs],
        )
        record(
            "crdtswarm_tcp_sync",
            tcp["crdtswarm", mode],
            "updates/s",
            mode=mode,
            updates=args.updates,
            runs=[round(r) for r in ours],
            ratio_vs_pycrdt_websocket=round(ratio, 3),
        )

    print()
    print(
        f"convergence: simulated network, one-way latency {MIN_LATENCY * 1000:.0f}-"
        f"{MAX_LATENCY * 1000:.0f} ms per pair, max_peers {args.max_peers}, batch_interval "
        f"{args.batch_interval * 1000:g} ms, seed {args.seed}, Python {platform.python_version()}"
    )
    print("all nodes in one process: 'sim' = simulated clock (CPU takes no time), 'wall' = real")
    print(
        f"{'N':>4}{'clock':>6}{'edits':>6}{'links':>6}{'setup s':>8}{'time ms':>9}"
        f"{'floor ms':>9}{'hops':>5}{'ratio':>7}{'max':>6}{'B/node':>8}{'floor B':>8}"
        f"{'ratio':>7}{'msgs/node':>10}{'cpu/node ms':>12}"
    )
    for n, clock, run, s in table:
        setup = f"{run.setup_wall:>8.1f}" if clock == "sim" else f"{'':>8}"
        print(
            f"{n:>4}{clock:>6}{len(run.edits[clock]):>6}{run.links:>6}{setup}{s['time']:>9.1f}"
            f"{s['floor']:>9.1f}{s['hops']:>5.1f}{s['ratio']:>7.2f}{s['max_ratio']:>6.2f}"
            f"{s['bytes']:>8.0f}{s['size']:>8.0f}{s['bytes_ratio']:>7.2f}{s['messages']:>10.2f}"
            f"{s['cpu']:>12.2f}"
        )
    print(
        "medians over the edits; ratio = measured / floor (max: the worst edit); "
        "targets: time <= 1.5x, bytes <= 3x"
    )
    print()
    print(
        f"sync throughput: {args.updates} map sets A -> B, loopback TCP, one process, "
        f"median of {args.runs} run(s)"
    )
    print(f"{'mode':<8}{'crdtswarm /s':>14}{'pycrdt-ws /s':>14}{'ratio':>8}")
    for mode in ("burst", "paced"):
        mine, other = tcp["crdtswarm", mode], tcp["pycrdt_websocket", mode]
        print(f"{mode:<8}{mine:>14.0f}{other:>14.0f}{mine / other:>8.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "convergence.json"
    out.write_text(json.dumps({"benchmark": "convergence", "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
