"""The scenario behind ``crdtswarm demo``: a swarm forms, edits, loses a node and carries on.

`DemoScenario.run` goes through these phases; each waits for its condition (woken
by the nodes' events and document changes, never a fixed sleep) and fails the demo
with `DemoFailedError` when ``timeout`` passes first:

1. start: an embedded `SignalingServer` (webrtc only) and N nodes, each in a task
   of its own so that one can be killed alone;
2. join, the seed's way: node i calls one earlier member (by key through the
   signaling server, at its TCP address, or by key on the simulated network); it
   has joined once every node lists it as a member and it lists them all;
3. mesh: every node is linked to every member it can reach directly (up to
   ``max_peers``);
4. edits: every node sets one entry of the shared document ``demo`` at once;
   converged when every node holds every entry (each node's map observer notes
   when an entry arrives);
5. sim only: a blocked pair routes through a relay (`Swarm.route`), and a call
   between them goes through it;
6. show: one edit per ``edit_interval`` by the next node, each timed, until half
   of ``duration``;
7. kill: one node shuts down (closes its links, leaves the directory); it must
   disappear from every survivor's peers and members. On the simulated network,
   with four nodes or more, the killed node is the relay of that blocked pair:
   the pair calls again through another relay, and its route moves off the dead one;
8. edits by the survivors, show until ``duration``, then a final check that the
   survivors' documents are equal and hold every edit ever made.

Every figure in the `DemoSummary` is measured on the event loop's clock; byte
counts are the links' own counters (sampled every 250 ms, so a link that lives
less than that may be missed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio
import pycrdt

from crdtswarm.cli.reports import (
    DemoSnapshot,
    DemoSummary,
    EditReport,
    FailoverReport,
    KillReport,
    LinkReport,
    NodeReport,
    RelayReport,
    RouteReport,
    figures,
    ms,
)
from crdtswarm.errors import ConnectError, RpcError
from crdtswarm.identity import Identity
from crdtswarm.relay import parse_relay_address
from crdtswarm.signaling import SignalingServer
from crdtswarm.swarm import PeerConnected, PeerDisconnected, Swarm
from crdtswarm.sync.directory import DOC_NAME as DIRECTORY_DOC
from crdtswarm.testing import SimulatedNetwork
from crdtswarm.transport.tcp import TcpTransport
from crdtswarm.transport.webrtc import WebRTCTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

    from anyio.abc import TaskGroup, TaskStatus

    from crdtswarm.identity import PublicKey
    from crdtswarm.peer import Peer
    from crdtswarm.swarm import SwarmEvent
    from crdtswarm.transport.abc import Transport

__all__ = ["TRANSPORTS", "DemoConfig", "DemoFailedError", "DemoScenario"]

TRANSPORTS: Final = ("webrtc", "tcp", "sim")
"""The values of `DemoConfig.transport`."""

DOC: Final = "demo"
"""The shared document every node opens."""
MAP: Final = "notes"
"""The map in `DOC` that the edits go into."""

_KILL_AT: Final = 0.5  # share of the duration after which a node is killed
_SAFETY_NET: Final = 0.1  # seconds: re-check conditions that have no event (routes)
_SAMPLE_INTERVAL: Final = 0.25  # seconds between two samples of the link counters
_LOG_LINES: Final = 12  # lines of the event log kept for the live view
_MIN_LATENCY, _MAX_LATENCY = 0.005, 0.040  # sim: one-way latency per pair, seconds


class DemoFailedError(Exception):
    """Raised inside the scenario when a phase's condition is not met within the timeout.

    `DemoScenario.run` catches it and returns a `DemoSummary` whose ``failure``
    is the message.
    """


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    """What `DemoScenario` runs.

    Raises:
        ValueError: on an unknown transport, fewer than 3 nodes, or a negative time.
    """

    transport: str = "webrtc"
    """``"webrtc"``, ``"tcp"`` or ``"sim"`` (see `TRANSPORTS`)."""
    nodes: int = 5
    """Nodes started (at least 3, so that two survive the kill); default 5."""
    duration: float = 20.0
    """Seconds the demo runs in all; the kill comes half-way (default 20)."""
    timeout: float = 30.0
    """Seconds any one phase may take before the demo fails (default 30)."""
    seed: int = 1
    """Seeds every random choice: who calls whom, who edits, which node dies; on the
    simulated network also the keys, latencies and blocked pairs (default 1)."""
    edit_interval: float = 1.0
    """Seconds between two edits while the demo only shows the swarm (default 1)."""

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
        if self.nodes < 3:
            raise ValueError(f"the demo needs at least 3 nodes, not {self.nodes}")
        if self.duration < 0 or self.timeout <= 0 or self.edit_interval <= 0:
            raise ValueError("duration must be >= 0, timeout and edit_interval > 0")


# -- nodes --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    index: int
    identity: Identity
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    swarm: Swarm | None = None
    notes: pycrdt.Map[str] | None = None
    state: str = "starting"
    joined_via: _Node | None = None
    call_ms: float | None = None
    join_ms: float | None = None

    @property
    def name(self) -> str:
        return f"node{self.index + 1}"

    @property
    def key(self) -> PublicKey:
        return self.identity.public_key

    @property
    def is_up(self) -> bool:
        return self.state == "up" and self.swarm is not None

    def up(self) -> Swarm:
        if self.swarm is None or self.state != "up":
            raise DemoFailedError(f"{self.name} is not running")
        return self.swarm


@dataclass(eq=False)
class _Milestone:
    """When a condition first held (seconds since the start), once ``done`` is set."""

    at: float | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class _LinkMeter:
    """Mux payload bytes per node, summed over every link it had (sampled)."""

    def __init__(self) -> None:
        self._links: dict[tuple[int, PublicKey, float], tuple[int, int]] = {}

    def sample(self, node: _Node) -> None:
        if not node.is_up or node.swarm is None:
            return
        for key, peer in node.swarm.peers.items():
            since = peer.connected_at
            if since is None:
                continue
            with contextlib.suppress(anyio.BrokenResourceError):
                stats = peer.statistics()
                self._links[node.index, key, since] = (stats.bytes_sent, stats.bytes_received)

    def totals(self, index: int) -> tuple[int, int]:
        sent = received = 0
        for (owner, _, _), (out, into) in self._links.items():
            if owner == index:
                sent += out
                received += into
        return sent, received


# -- the scenario -------------------------------------------------------------------------


class DemoScenario:
    """Runs the demo's phases (see the module docstring) and measures them.

    Args:
        config: what to run.
        on_log: called with (seconds since the start, text) for every line of the
            event log, as it happens.
    """

    def __init__(
        self, config: DemoConfig, *, on_log: Callable[[float, str], None] | None = None
    ) -> None:
        self.config = config
        self.phase = "starting"
        self._on_log = on_log
        self._rng = random.Random(config.seed)
        self._is_sim = config.transport == "sim"
        self._log: deque[tuple[float, str]] = deque(maxlen=_LOG_LINES)
        self._nodes: list[_Node] = []
        self._names: dict[PublicKey, str] = {}
        self._index: dict[PublicKey, int] = {}
        self._net = SimulatedNetwork(seed=config.seed) if self._is_sim else None
        self._blocked: set[frozenset[int]] = set()
        self._watched: tuple[int, int] | None = None
        self._signaling_url: str | None = None
        self._meter = _LinkMeter()
        self._links_up: set[frozenset[int]] = set()
        self._expected: dict[str, str] = {}
        self._edited_at: dict[str, float] = {}
        self._arrivals: dict[str, dict[int, float]] = {}
        self._edits: list[EditReport] = []
        self._editor = 0
        self._t0: float | None = None
        self._started_ms: float | None = None
        self._first_call: float | None = None
        self._mesh_ms: float | None = None
        self._relay: RelayReport | None = None
        self._killed: KillReport | None = None
        self._changed: anyio.Event | None = None
        self._task_group: TaskGroup | None = None
        self._final: DemoSnapshot | None = None

    # -- running --------------------------------------------------------------------------

    async def run(self) -> DemoSummary:
        """Run every phase; return what was measured (``ok`` False when a phase failed).

        Raises:
            OSError: a node or the signaling server could not start.
        """
        self._t0 = anyio.current_time()
        self._changed = anyio.Event()
        identity = self._seeded_identity if self._is_sim else Identity.generate
        self._nodes = [_Node(i, identity()) for i in range(self.config.nodes)]
        self._names = {node.key: node.name for node in self._nodes}
        self._index = {node.key: node.index for node in self._nodes}
        failure: str | None = None
        async with contextlib.AsyncExitStack() as stack:
            if self.config.transport == "webrtc":
                server = SignalingServer(host="127.0.0.1", port=0)
                await stack.enter_async_context(server)
                self._signaling_url = server.url
            tg = self._task_group = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(self._sample_forever)
            try:
                await self._phases()
            except DemoFailedError as exc:
                failure = str(exc)
                self._say(f"FAILED: {failure}")
            for node in self._nodes:
                self._meter.sample(node)
            summary = self._summary(failure)
            self._final = self.snapshot()  # what the live view keeps showing from now on
            self.phase = "stopping"
            for node in self._nodes:
                node.stop.set()
            for node in self._nodes:
                if node.swarm is not None:  # started: wait for its graceful shutdown
                    await node.done.wait()
            tg.cancel_scope.cancel()
        self.phase = "done" if failure is None else "failed"
        return summary

    async def _phases(self) -> None:
        await self._start()
        await self._join()
        await self._mesh()
        await self._edit_round("first edits", self._alive())
        if self._is_sim:
            await self._relay_phase()
        await self._show(self.config.duration * _KILL_AT)
        await self._kill()
        await self._edit_round("edits after the kill", self._alive())
        await self._show(self.config.duration)
        await self._final_check()

    # -- phases ---------------------------------------------------------------------------

    async def _start(self) -> None:
        self.phase = "starting nodes"
        if self._net is not None:
            self._plan_network(self._net)
        for node in self._nodes:
            await self._tg.start(self._host, node)
        self._started_ms = ms(self._now())
        where = {
            "webrtc": f"WebRTC, signaling server {self._signaling_url}",
            "tcp": "TCP on 127.0.0.1",
            "sim": f"the simulated network (seed {self.config.seed})",
        }[self.config.transport]
        self._say(f"{len(self._nodes)} nodes up on {where} in {self._started_ms:.0f} ms")
        if self._net is not None:
            pairs = ", ".join(
                "-".join(self._nodes[i].name for i in sorted(p))
                for p in sorted(self._blocked_pairs())
            )
            self._say(f"blocked on the network: {pairs} (one-way latencies 5-40 ms)")

    async def _join(self) -> None:
        self.phase = "joining"
        self._say(f"{self._nodes[0].name} ({self._nodes[0].key.short}) is the first member")
        for node in self._nodes[1:]:
            await self._join_one(node, self._join_target(node))

    async def _join_one(self, node: _Node, target: _Node) -> None:
        """``node`` calls ``target``; wait until it is a member everywhere."""
        node.joined_via = target
        address: str | None = None
        how = "by key on the simulated network"
        if self.config.transport == "tcp":
            address = next(a for a in target.up().addresses if a.startswith("tcp://"))
            how = f"at {address}"
        elif self.config.transport == "webrtc":
            how = "by key (offer through the signaling server)"
        start = self._now()
        if self._first_call is None:
            self._first_call = start
        try:
            await node.up().call(target.key, address, timeout=self.config.timeout)
        except (ConnectError, TimeoutError) as exc:
            raise DemoFailedError(
                f"{node.name} could not join: its call to {target.name} failed: {_why(exc)}"
            ) from exc
        node.call_ms = ms(self._now() - start)
        joined = self._nodes[: node.index + 1]
        keys = {n.key for n in joined}

        def is_member() -> bool:
            return keys <= node.up().members and all(node.key in n.up().members for n in joined)

        await self._until(
            is_member,
            lambda: (
                f"{node.name} never joined: linked to {target.name}, but not a member "
                f"everywhere after {self.config.timeout:g} s"
            ),
        )
        node.join_ms = ms(self._now() - start)
        self._say(
            f"{node.name} called {target.name} {how}: linked in {node.call_ms:.0f} ms, "
            f"a member everywhere after {node.join_ms:.0f} ms"
        )

    async def _mesh(self) -> None:
        self.phase = "forming the mesh"
        nodes = self._alive()

        def lacking() -> dict[_Node, int]:
            missing = {}
            for node in nodes:
                swarm = node.up()
                expected = {n.key for n in nodes if n is not node and not self._is_blocked(n, node)}
                have = self._direct_keys(swarm)
                wanted = min(len(expected), swarm.config.mesh.max_peers)
                if len(have & expected) < wanted:
                    missing[node] = wanted - len(have & expected)
            return missing

        await self._until(
            lambda: not lacking(),
            lambda: (
                "the mesh did not form: "
                + ", ".join(f"{n.name} lacks {k} link(s)" for n, k in lacking().items())
            ),
        )
        start = self._first_call if self._first_call is not None else 0.0
        self._mesh_ms = ms(self._now() - start)
        self._say(
            f"mesh complete: {self._link_count()} direct links, "
            f"{self._mesh_ms:.0f} ms after the first call"
        )

    async def _edit_round(self, label: str, editors: list[_Node]) -> None:
        self.phase = label
        keys = [self._edit(node) for node in editors]  # at the same instant
        took = await self._converge(keys, label)
        self._say(
            f"{label}: {len(keys)} nodes edited '{DOC}' at once; every node had all "
            f"{len(keys)} edits after {took:.1f} ms"
        )

    async def _relay_phase(self) -> None:
        if self._watched is None:
            return
        self.phase = "routing through a relay"
        a, c = (self._nodes[i] for i in self._watched)
        source = a.up()

        def routed() -> bool:
            route = source.route(c.key)
            return bool(route.hops) and route.latency is not None

        await self._until(
            routed,
            lambda: (
                f"{a.name} found no route to {c.name} through a relay "
                f"within {self.config.timeout:g} s"
            ),
        )
        start = self._first_call if self._first_call is not None else 0.0
        route_s = round(self._now() - start, 3)
        route = source.route(c.key)
        hops = self._hop_names(route.hops)
        expected = ms(route.latency) if route.latency is not None else None
        self._say(
            f"{a.name} <-> {c.name} is blocked; route() goes via {' -> '.join(hops)} "
            f"(expected round trip {expected if expected is not None else '?'} ms)"
        )
        started = self._now()
        peer, linked_at, ping_ms = await self._call_and_ping(
            source, c.key, f"{a.name} could not reach {c.name} through a relay"
        )
        link_ms = ms(linked_at - started)
        address = peer.remote_address
        self._say(
            f"{a.name} called {c.name}: link through {self._via(address)} up in "
            f"{link_ms:.0f} ms; a ping through it took {ping_ms:.0f} ms"
        )
        self._relay = RelayReport(
            source=a.name,
            target=c.name,
            blocked=tuple(
                (self._nodes[i].name, self._nodes[j].name) for i, j in self._blocked_pairs()
            ),
            route_s=route_s,
            hops=hops,
            expected_rtt_ms=expected,
            remote_address=address,
            link_ms=link_ms,
            ping_ms=ping_ms,
            failover=None,
            failover_skipped=None,
        )

    async def _show(self, until: float) -> None:
        """Until ``until`` seconds since the start: one timed edit every ``edit_interval``."""
        self.phase = "running"
        while (left := until - self._now()) > 0:
            await anyio.sleep(min(left, self.config.edit_interval))  # pacing the show
            if self._now() >= until:
                return
            alive = self._alive()
            node = alive[self._editor % len(alive)]
            self._editor += 1
            key = self._edit(node)
            took = await self._converge([key], f"the edit by {node.name}")
            self._say(f"{node.name} edited '{DOC}': every node had it after {took:.1f} ms")

    async def _kill(self) -> None:
        victim, failover = self._choose_victim()
        self.phase = f"killing {victim.name}"
        self._say(f"killing {victim.name}: it closes its links and leaves the directory")
        self._meter.sample(victim)
        survivors = [n for n in self._alive() if n is not victim]

        def still_there() -> list[_Node]:
            return [
                n for n in survivors if victim.key in n.up().peers or victim.key in n.up().members
            ]

        # watched from the kill on, while the victim shuts down
        gone = self._milestone(lambda: not still_there())
        rerouted = self._milestone(self._avoids(victim)) if failover else None
        killed_at = self._now()
        victim.stop.set()
        await victim.done.wait()
        shutdown_ms = ms(self._now() - killed_at)
        await gone.done.wait()
        if gone.at is None:
            raise DemoFailedError(
                f"{victim.name} was killed but "
                + ", ".join(n.name for n in still_there())
                + f" still list it as a peer or member after {self.config.timeout:g} s"
            )
        gone_ms = ms(gone.at - killed_at)
        self._killed = KillReport(
            name=victim.name,
            key=str(victim.key),
            at_s=round(killed_at, 3),
            shutdown_ms=shutdown_ms,
            gone_ms=gone_ms,
        )
        self._say(
            f"{victim.name} is gone from the peers and members of all {len(survivors)} "
            f"survivors {gone_ms:.0f} ms after the kill (its shutdown took {shutdown_ms:.0f} ms)"
        )
        if rerouted is not None:
            await self._failover(victim, killed_at, rerouted)
        elif self._relay is not None:
            self._relay = dataclasses.replace(
                self._relay,
                failover_skipped="with 3 nodes there is no second relay (use --nodes 4 or more)",
            )

    async def _failover(self, relay: _Node, killed_at: float, rerouted: _Milestone) -> None:
        """The blocked pair links again through another relay; its route moves off ``relay``.

        ``rerouted`` has watched, since the kill, for the route to avoid ``relay``.
        """
        if self._watched is None or self._relay is None:
            return
        self.phase = "failing over"
        a, c = (self._nodes[i] for i in self._watched)
        source = a.up()

        def through_dead_relay() -> bool:
            peer = source.peers.get(c.key)
            return peer is not None and relay.key in self._relays_of(peer.remote_address)

        await self._until(
            lambda: not through_dead_relay(),
            lambda: f"{a.name}'s link to {c.name} still goes through the dead {relay.name}",
        )
        peer, linked_at, ping_ms = await self._call_and_ping(
            source, c.key, f"{a.name} could not reach {c.name} again after its relay died"
        )
        relink_ms = ms(linked_at - killed_at)
        address = peer.remote_address
        self._say(
            f"{a.name} called {c.name} again: through {self._via(address)} "
            f"{relink_ms:.0f} ms after the kill; a ping took {ping_ms:.0f} ms"
        )

        await rerouted.done.wait()
        if rerouted.at is None:
            raise DemoFailedError(
                f"route() from {a.name} to {c.name} still uses the dead {relay.name} "
                f"{self.config.timeout:g} s after the kill"
            )
        route_ms = ms(max(0.0, rerouted.at - killed_at))
        route = source.route(c.key)
        route_hops = self._hop_names(route.hops)
        via = " -> ".join(route_hops) or "a direct link"
        if route_ms == 0:  # the route had moved on (rows changed) before the link did
            self._say(f"route() from {a.name} to {c.name} had already moved to {via}")
        else:
            self._say(
                f"route() from {a.name} to {c.name} avoids {relay.name} "
                f"{route_ms / 1000:.1f} s after the kill: via {via}"
            )
        self._relay = dataclasses.replace(
            self._relay,
            failover=FailoverReport(
                killed_relay=relay.name,
                hops=self._hop_names(self._relays_of(address)),
                remote_address=address,
                relink_ms=relink_ms,
                ping_ms=ping_ms,
                route_ms=route_ms,
                route_hops=route_hops,
                expected_rtt_ms=ms(route.latency) if route.latency is not None else None,
            ),
        )

    async def _final_check(self) -> None:
        self.phase = "final check"
        survivors = self._alive()

        def differing() -> list[_Node]:
            return [n for n in survivors if self._content(n) != self._expected]

        await self._until(
            lambda: not differing(),
            lambda: (
                "the documents differ at the end: "
                + ", ".join(
                    f"{n.name} has {len(self._content(n))} entries (digest {self._digest(n)})"
                    for n in differing()
                )
                + f"; {len(self._expected)} edits were made"
            ),
        )
        digest = self._digest(survivors[0])
        self._say(
            f"all {len(survivors)} survivors hold the same {len(self._expected)} entries "
            f"(digest {digest})"
        )

    # -- nodes ----------------------------------------------------------------------------

    async def _host(self, node: _Node, *, task_status: TaskStatus[None]) -> None:
        """Run one node until its ``stop`` event is set."""
        signaling = [self._signaling_url] if self._signaling_url else []
        try:
            async with Swarm(
                identity=node.identity, transports=self._transports(), signaling=signaling
            ) as swarm:
                notes = swarm.doc(DOC).get(MAP, type=pycrdt.Map)
                notes.observe(self._arrival_observer(node))
                swarm.doc(DIRECTORY_DOC).observe(lambda _event: self._poke())
                events = swarm.events()  # before any call: no event is missed
                node.swarm, node.notes, node.state = swarm, notes, "up"
                self._tg.start_soon(self._pump, node, events)
                task_status.started()
                await node.stop.wait()
                self._meter.sample(node)
                node.state = "stopping"
        finally:
            node.state = "stopped" if self.phase == "stopping" else "killed"
            node.done.set()
            self._poke()

    def _transports(self) -> list[Transport]:
        if self._net is not None:
            return [self._net.transport()]
        if self.config.transport == "tcp":
            return [TcpTransport("127.0.0.1", 0)]
        return [WebRTCTransport()]

    async def _pump(self, node: _Node, events: AsyncIterator[SwarmEvent]) -> None:
        async for event in events:
            if isinstance(event, PeerConnected | PeerDisconnected):
                self._on_link_event(node, event)
            self._poke()

    def _on_link_event(self, node: _Node, event: PeerConnected | PeerDisconnected) -> None:
        index = self._index.get(event.public_key)
        if index is None or self.phase == "stopping":
            return
        other, pair = self._nodes[index].name, frozenset({node.index, index})
        if isinstance(event, PeerConnected) and pair not in self._links_up:
            self._links_up.add(pair)
            peer = node.swarm.peers.get(event.public_key) if node.swarm else None
            kind = self._via(peer.remote_address) if peer is not None else "?"
            self._say(f"link {node.name} <-> {other} up ({kind})")
        elif isinstance(event, PeerDisconnected) and pair in self._links_up:
            self._links_up.discard(pair)
            reason = event.reason if len(event.reason) <= 60 else event.reason[:59] + "…"
            self._say(f"link {node.name} <-> {other} down: {reason}")

    def _arrival_observer(self, node: _Node) -> Callable[[pycrdt.MapEvent], None]:
        """A map observer that notes when each awaited edit reaches ``node``."""

        def on_change(_event: pycrdt.MapEvent) -> None:
            now = self._now()
            notes = node.notes
            if notes is not None:
                for key, arrivals in self._arrivals.items():
                    if node.index not in arrivals and key in notes:
                        arrivals[node.index] = now
            self._poke()

        return on_change

    def _edit(self, node: _Node) -> str:
        notes = node.notes
        if notes is None or not node.is_up:
            raise DemoFailedError(f"{node.name} cannot edit: it is not running")
        key = f"{node.name}.{len(self._expected) + 1}"
        value = f"edit {len(self._expected) + 1} by {node.name} at {self._now():.1f} s"
        self._expected[key] = value
        self._edited_at[key] = self._now()
        self._arrivals[key] = {}
        notes[key] = value  # the local observer notes its arrival here at once
        return key

    async def _converge(self, keys: list[str], label: str) -> float:
        """Wait until every live node has the edits ``keys``; return milliseconds."""
        nodes = self._alive()

        def lacking() -> dict[_Node, int]:
            missing: dict[_Node, int] = {}
            for node in nodes:
                count = sum(node.index not in self._arrivals[key] for key in keys)
                if count:
                    missing[node] = count
            return missing

        await self._until(
            lambda: not lacking(),
            lambda: (
                f"{label} did not reach every node within {self.config.timeout:g} s: "
                + ", ".join(f"{n.name} lacks {k} of {len(keys)}" for n, k in lacking().items())
            ),
        )
        start = min(self._edited_at[key] for key in keys)
        last = max(self._arrivals[key][n.index] for key in keys for n in nodes)
        took = ms(last - start)
        self._edits.append(
            EditReport(
                by=tuple(k.split(".")[0] for k in keys), at_s=round(start, 3), converge_ms=took
            )
        )
        return took

    # -- the simulated network -------------------------------------------------------------

    def _seeded_identity(self) -> Identity:
        return Identity(self._rng.randbytes(32))

    def _plan_network(self, net: SimulatedNetwork) -> None:
        """Latencies for every pair, and the blocked pairs (see `_block_plan`)."""
        n = len(self._nodes)
        for i in range(n):
            for j in range(i + 1, n):
                latency = round(self._rng.uniform(_MIN_LATENCY, _MAX_LATENCY), 3)
                net.set_latency(self._nodes[i].key, self._nodes[j].key, latency)
        self._watched, self._blocked = _block_plan(n, self._rng)
        for pair in self._blocked:
            i, j = sorted(pair)
            net.block(self._nodes[i].key, self._nodes[j].key)

    def _blocked_pairs(self) -> list[tuple[int, int]]:
        watched = [self._watched] if self._watched else []
        others = sorted((min(p), max(p)) for p in self._blocked if (min(p), max(p)) not in watched)
        return watched + others

    def _is_blocked(self, a: _Node, b: _Node) -> bool:
        return frozenset({a.index, b.index}) in self._blocked

    def _join_target(self, node: _Node) -> _Node:
        earlier = [n for n in self._nodes[: node.index] if not self._is_blocked(n, node)]
        return self._rng.choice(earlier)

    def _choose_victim(self) -> tuple[_Node, bool]:
        """The node to kill, and whether its death is a relay failover to show."""
        if self._watched is not None and self._relay is not None:
            a, c = (self._nodes[i] for i in self._watched)
            peer = a.up().peers.get(c.key)
            relays = self._relays_of(peer.remote_address if peer else None)
            if len(self._nodes) >= 4 and relays:
                return next(n for n in self._nodes if n.key == relays[0]), True
            return c, False
        return self._rng.choice(self._nodes), False

    async def _call_and_ping(
        self, source: Swarm, target: PublicKey, failure: str
    ) -> tuple[Peer, float, float]:
        """Call ``target`` from ``source`` and ping it: (peer, when linked, ping in ms).

        Raises:
            DemoFailedError: ``failure``, with the reason, when either step fails.
        """
        timeout = self.config.timeout
        try:
            peer = await source.call(target, timeout=timeout)
            linked_at = self._now()
            ping_ms = ms(await peer.ping(timeout=timeout))
        except (ConnectError, TimeoutError, RpcError, anyio.BrokenResourceError) as exc:
            raise DemoFailedError(f"{failure}: {_why(exc)}") from exc
        return peer, linked_at, ping_ms

    # -- waiting ----------------------------------------------------------------------------

    def _poke(self) -> None:
        changed = self._changed
        if changed is not None:  # wake every waiter, and give later ones a fresh event
            self._changed = anyio.Event()
            changed.set()

    async def _until(self, condition: Callable[[], bool], failure: Callable[[], str]) -> None:
        """Wait until ``condition()`` holds, re-checked after every event of any node.

        Routes change when a node has digested a directory update, a moment after
        the update itself, and have no event of their own: a safety-net re-check
        every 100 ms covers them.

        Raises:
            DemoFailedError: with ``failure()`` when ``timeout`` passes first.
        """
        with anyio.move_on_after(self.config.timeout):
            while True:
                if self._changed is None:
                    self._changed = anyio.Event()
                changed = self._changed  # taken before the check: no change is missed
                if condition():
                    return
                with anyio.move_on_after(_SAFETY_NET):
                    await changed.wait()
        if not condition():
            raise DemoFailedError(failure())

    def _milestone(self, condition: Callable[[], bool]) -> _Milestone:
        """Note, from now on, when ``condition()`` first holds (within ``timeout``)."""
        milestone = _Milestone()

        async def watch() -> None:
            with contextlib.suppress(DemoFailedError):
                await self._until(condition, str)
                milestone.at = self._now()
            milestone.done.set()

        self._tg.start_soon(watch)
        return milestone

    def _avoids(self, relay: _Node) -> Callable[[], bool]:
        """Whether the blocked pair's route is known and avoids ``relay``."""
        if self._watched is None:
            return lambda: True
        a, c = (self._nodes[i] for i in self._watched)
        source = a.up()

        def avoids() -> bool:
            route = source.route(c.key)
            return route.latency is not None and relay.key not in route.hops

        return avoids

    async def _sample_forever(self) -> None:
        while True:
            for node in self._nodes:
                self._meter.sample(node)
            await anyio.sleep(_SAMPLE_INTERVAL)

    # -- views ------------------------------------------------------------------------------

    def snapshot(self) -> DemoSnapshot:
        """What the swarm looks like now, for the live view.

        Once the nodes are being stopped: what it looked like just before.
        """
        if self._final is not None:
            return dataclasses.replace(self._final, phase=self.phase, elapsed=self._now())
        nodes = tuple(self._node_report(n) for n in self._nodes)
        return DemoSnapshot(
            transport=self.config.transport,
            node_count=self.config.nodes,
            seed=self.config.seed,
            duration=self.config.duration,
            elapsed=self._now() if self._t0 is not None else 0.0,
            phase=self.phase,
            signaling_url=self._signaling_url,
            nodes=nodes,
            routes=self._routes(),
            edits=len(self._expected),
            last_converge_ms=self._edits[-1].converge_ms if self._edits else None,
            bytes_sent=sum(n.bytes_sent for n in nodes),
            network_bytes=self._net.statistics().bytes if self._net is not None else None,
            log=tuple(self._log),
        )

    def _node_report(self, node: _Node) -> NodeReport:
        links: list[LinkReport] = []
        members = 0
        relayed = 0
        if node.is_up and node.swarm is not None:
            swarm = node.swarm
            members = len(swarm.members)
            relayed = swarm.statistics().relay.bytes_relayed
            for key, peer in sorted(swarm.peers.items(), key=lambda kv: self._order(kv[0])):
                with contextlib.suppress(anyio.BrokenResourceError):
                    stats = peer.statistics()
                    links.append(
                        LinkReport(
                            peer=self._names.get(key, key.short),
                            transport=stats.transport,
                            rtt_ms=ms(stats.rtt) if stats.rtt is not None else None,
                            remote_address=stats.remote_address,
                            via=self._via(stats.remote_address, stats.transport),
                        )
                    )
        sent, received = self._meter.totals(node.index)
        return NodeReport(
            name=node.name,
            key=str(node.key),
            state=node.state,
            joined_via=node.joined_via.name if node.joined_via else None,
            call_ms=node.call_ms,
            join_ms=node.join_ms,
            members=members,
            links=tuple(links),
            bytes_sent=sent,
            bytes_received=received,
            bytes_relayed=relayed,
            doc_entries=len(self._content(node)),
            doc_digest=self._digest(node),
        )

    def _routes(self) -> tuple[RouteReport, ...]:
        routes = []
        for i, j in self._blocked_pairs():
            a, c = self._nodes[i], self._nodes[j]
            if not (a.is_up and c.is_up) or a.swarm is None:
                continue
            route = a.swarm.route(c.key)
            peer = a.swarm.peers.get(c.key)
            routes.append(
                RouteReport(
                    source=a.name,
                    target=c.name,
                    hops=self._hop_names(route.hops),
                    expected_rtt_ms=ms(route.latency) if route.latency is not None else None,
                    link=peer.remote_address if peer is not None else None,
                    link_via=self._via(peer.remote_address) if peer is not None else None,
                )
            )
        return tuple(routes)

    def _summary(self, failure: str | None) -> DemoSummary:
        survivors = [n for n in self._nodes if n.is_up]
        reports = tuple(self._node_report(n) for n in self._nodes)
        alive = {r.name for r in reports if r.state == "up"}
        rtts = [
            link.rtt_ms
            for r in reports
            if r.name in alive
            for link in r.links
            if link.rtt_ms is not None and link.transport != "relay"
        ]
        converged = bool(survivors) and all(self._content(n) == self._expected for n in survivors)
        return DemoSummary(
            ok=failure is None,
            failure=failure,
            transport=self.config.transport,
            node_count=self.config.nodes,
            seed=self.config.seed,
            duration_s=self.config.duration,
            elapsed_s=round(self._now(), 3),
            signaling_url=self._signaling_url,
            started_ms=self._started_ms,
            join_call_ms=figures(n.call_ms for n in self._nodes if n.call_ms is not None),
            join_ms=figures(n.join_ms for n in self._nodes if n.join_ms is not None),
            mesh_ms=self._mesh_ms,
            links=self._link_count(),
            edits=tuple(self._edits),
            convergence_ms=figures(e.converge_ms for e in self._edits),
            killed=self._killed,
            relay=self._relay,
            rtt_ms=figures(rtts),
            bytes_sent=sum(r.bytes_sent for r in reports),
            bytes_received=sum(r.bytes_received for r in reports),
            network_bytes=self._net.statistics().bytes if self._net is not None else None,
            converged=converged,
            doc_entries=len(self._expected),
            doc_digest=self._digest(survivors[0]) if converged else None,
            nodes=reports,
        )

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _tg(self) -> TaskGroup:
        if self._task_group is None:
            raise RuntimeError("the scenario is not running")
        return self._task_group

    def _now(self) -> float:
        return anyio.current_time() - (self._t0 or 0.0)

    def _say(self, text: str) -> None:
        now = self._now()
        self._log.append((now, text))
        if self._on_log is not None:
            self._on_log(now, text)

    def _alive(self) -> list[_Node]:
        return [n for n in self._nodes if n.is_up]

    def _order(self, key: PublicKey) -> int:
        return self._index.get(key, -1)

    def _hop_names(self, keys: Iterable[PublicKey]) -> tuple[str, ...]:
        return tuple(self._names.get(k, k.short) for k in keys)

    @staticmethod
    def _relays_of(address: str | None) -> tuple[PublicKey, ...]:
        if address is None or not address.startswith("relay://"):
            return ()
        try:
            return parse_relay_address(address)[0]
        except ValueError:
            return ()

    def _via(self, address: str | None, transport: str = "?") -> str:
        """``"relay via node1"`` for a relayed address, else its scheme."""
        relays = self._relays_of(address)
        if relays:
            return "relay via " + " -> ".join(self._hop_names(relays))
        return address.split("://")[0] if address else transport

    @staticmethod
    def _direct_keys(swarm: Swarm) -> set[PublicKey]:
        keys = set()
        for key, peer in swarm.peers.items():
            with contextlib.suppress(anyio.BrokenResourceError):
                if peer.statistics().transport != "relay":
                    keys.add(key)
        return keys

    def _link_count(self) -> int:
        alive = self._alive()
        pairs = {frozenset({n.key, key}) for n in alive for key in self._direct_keys(n.up())}
        alive_keys = {n.key for n in alive}
        return sum(1 for pair in pairs if pair <= alive_keys)

    @staticmethod
    def _content(node: _Node) -> dict[str, str]:
        return dict(node.notes.items()) if node.notes is not None else {}

    def _digest(self, node: _Node) -> str:
        text = json.dumps(sorted(self._content(node).items()))
        return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _why(error: BaseException) -> str:
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    return str(error) or type(error).__name__


def _block_plan(n: int, rng: random.Random) -> tuple[tuple[int, int], set[frozenset[int]]]:
    """The watched blocked pair and every blocked pair, for ``n`` nodes.

    The watched pair leaves node1 out (so each can call it to join); with six nodes
    or more, ``(n - 4) // 2`` more pairs are blocked, as long as every node keeps two
    direct partners, every newcomer an earlier member to call, and the watched pair
    two relays in common (one to lose, one to fail over to).
    """
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    watched = rng.choice([(i, j) for i, j in pairs if i > 0])
    blocked = {frozenset(watched)}
    extra = (n - 4) // 2 if n >= 6 else 0

    def fine(plan: set[frozenset[int]]) -> bool:
        def partners(i: int) -> set[int]:
            return {j for j in range(n) if j != i and frozenset({i, j}) not in plan}

        a, c = watched
        return (
            all(len(partners(i)) >= 2 for i in range(n))
            and all(any(j < i for j in partners(i)) for i in range(1, n))
            and len(partners(a) & partners(c)) >= 2
        )

    rng.shuffle(pairs)
    for i, j in pairs:
        if len(blocked) > extra:
            break
        trial = blocked | {frozenset({i, j})}
        if trial != blocked and fine(trial):
            blocked = trial
    return watched, blocked
