"""`Swarm`: the object applications use.

A swarm node listens on its transports, dials other nodes by public key (and an
address where the transport needs one), authenticates every link with the Noise
handshake, multiplexes it, and keeps at most one link per remote node.

Lifecycle: ``async with Swarm(...) as node:`` starts the transports; leaving the
block closes every link gracefully, stops the transports and leaves no task,
socket or file behind.

Duplicate links: when two nodes call each other at the same moment, both keep the
link that the node with the smaller public key dialled (`crdtswarm.peer` computes
the rule) and close the other; applications see one `PeerConnected`. A direct link
always wins over a relayed one, whoever dialled.

Relays (`crdtswarm.relay`): every node relays for its peers (`SwarmConfig.relay`)
and can be reached through them: `Swarm.call` without an address, and
`Swarm.open_stream`, dial through the relays of `Swarm.route` first when it has
any, then the transports that dial by key, then through up to three direct peers
(those whose latency rows show a link to the target first). A relayed link is a normal `Peer` (its
``remote_address`` is ``relay://...``) whose Noise session runs end to end; it is
never published in our latency row, never relays further, and is replaced when a
direct link to the same node comes up (the mesh keeps trying one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from crdtswarm.errors import (
    ConnectError,
    ErrorCode,
    RemoteProtocolError,
    RpcError,
    UnsupportedBackendError,
)
from crdtswarm.identity import Identity, PublicKey
from crdtswarm.log import ContextLogger
from crdtswarm.mesh import MeshConfig, MeshPolicy
from crdtswarm.mux import MuxConnection, MuxStream, StreamHandler
from crdtswarm.peer import APP_PREFIX, Peer, _Connection, _is_preferred
from crdtswarm.protocol.mux import MuxConfig
from crdtswarm.protocol.probe import ProbeConfig, ProbeScheduler, ProbeStatistics
from crdtswarm.protocol.routing import LinkGraph, Route, Router, RoutingConfig
from crdtswarm.protocol.topology import elect_relays, near_candidates, nearest
from crdtswarm.relay import PROTOCOL as RELAY_PROTOCOL
from crdtswarm.relay import SCHEME as RELAY_SCHEME
from crdtswarm.relay import (
    RelayConfig,
    RelayService,
    RelayStatistics,
    RelayTransport,
    fallback_relays,
    is_relayed,
    parse_relay_address,
    relay_address,
)
from crdtswarm.rpc import PING_METHOD, RpcChannel, RpcHandler
from crdtswarm.rpc import PROTOCOL as RPC_PROTOCOL
from crdtswarm.secure import SecureChannel, establish
from crdtswarm.signaling.client import SignalingClient
from crdtswarm.signals import FORWARD_METHOD, SignalConfig, SignalRouter, SignalStatistics
from crdtswarm.sync.directory import (
    DOC_NAME as DIRECTORY_DOC,
)
from crdtswarm.sync.directory import (
    Directory,
    DirectoryConfig,
    MemberJoined,
    MemberLeft,
)
from crdtswarm.sync.replica import PROTOCOL as SYNC_PROTOCOL
from crdtswarm.sync.replica import ReplicaConfig, ReplicaStatistics, Replicator
from crdtswarm.sync.store import DocStore
from crdtswarm.transport.abc import LinkAttribute
from crdtswarm.transport.webrtc import WebRTCTransport

if TYPE_CHECKING:
    import os

    import pycrdt
    from anyio.abc import TaskGroup, TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from crdtswarm.transport.abc import Link, Transport

__all__ = [
    "PeerConnected",
    "PeerDisconnected",
    "Swarm",
    "SwarmConfig",
    "SwarmEvent",
    "SwarmStatistics",
]

logger = logging.getLogger(__name__)

AppStreamHandler = Callable[[MuxStream, PublicKey], Awaitable[None]]
"""``async def handler(stream, remote_key)``: serves one incoming application stream."""

_IDENTITY_FILE = "identity.key"
_DOCS_FILE = "docs.sqlite3"
_CONTACTS_FILE = "contacts.json"
_MESH_FULL = "mesh full"
_MAX_CONTACTS = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmConfig:
    """Tuning of a `Swarm`; every field has a sensible default."""

    handshake_timeout: float = 10.0
    """Seconds an incoming or outgoing handshake may take (default 10)."""
    max_pending_handshakes: int = 64
    """Incoming handshakes in progress at once; more links are dropped at once (default 64)."""
    keepalive_interval: float = 5.0
    """Seconds of silence on a link before we ping it (default 5)."""
    peer_timeout: float = 20.0
    """Seconds of silence after which a peer is declared dead (default 20)."""
    stream_window_size: int = 256 * 1024
    """Per-stream flow-control window in bytes: the most unread data per stream (256 KiB)."""
    max_streams_per_peer: int = 256
    """Concurrent substreams a peer may open to us (default 256)."""
    event_queue_size: int = 1024
    """Events buffered per `Swarm.events` subscriber before new ones are dropped (1024)."""
    close_timeout: float = 2.0
    """Seconds `Swarm` waits for links to close gracefully on exit (default 2)."""
    replica: ReplicaConfig = dataclasses.field(default_factory=ReplicaConfig)
    """Document replication limits and batching (see `ReplicaConfig`)."""
    directory: DirectoryConfig = dataclasses.field(default_factory=DirectoryConfig)
    """Membership directory timing and limits (see `DirectoryConfig`)."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """Whom to link to: ``mesh.max_peers`` links (8), retries (see `MeshConfig`)."""
    auto_mesh: bool = True
    """Link to the directory's members by ourselves (default True). With False the
    node only has the links the application makes with `Swarm.call`."""
    dial_timeout: float = 20.0
    """Seconds a mesh dial to a member may take (default 20: over WebRTC with UDP
    blocked, ICE gathering alone waits 5 s for STUN on each side before TURN/TCP)."""
    dial_stagger: float = 3.0
    """Seconds a call that may use relays waits for one attempt (direct by key, or
    through the route's relays) before it also starts the next one (3); the first
    link up wins."""
    probe: ProbeConfig | None = dataclasses.field(default_factory=ProbeConfig)
    """When and how each direct link is probed (see `crdtswarm.protocol.probe`);
    None: only one ping when a link comes up."""
    routing: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)
    """How routes are chosen: at most ``max_relays`` relays (2, the most a relayed
    circuit takes; 0 turns relayed routes off), and the hysteresis a better path
    must clear (10 ms and 10 %; see `crdtswarm.protocol.routing`)."""
    signaling_timeout: float = 5.0
    """Seconds entering a `Swarm` waits to register on a signaling server (5); it
    goes on without one after that (the client keeps trying)."""
    signals: SignalConfig = dataclasses.field(default_factory=SignalConfig)
    """How WebRTC signals travel (see `crdtswarm.signals.SignalConfig`)."""
    link_publish_delay: float = 1.0
    """Seconds link changes are gathered before our latency row is republished (1)."""
    link_publish_interval: float = 5.0
    """Least seconds between two publications of our latency row (5). A stale row
    costs only extra copies of updates, never a lost one (see `crdtswarm.sync.replica`)."""
    relay: RelayConfig = dataclasses.field(default_factory=RelayConfig)
    """What this node does as a relay for its peers (see `crdtswarm.relay.RelayConfig`)."""

    def __post_init__(self) -> None:
        if self.routing.max_relays > 2:
            raise ValueError(
                f"routing.max_relays is at most 2 (a circuit's), got {self.routing.max_relays}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerConnected:
    """A link to ``public_key`` came up (direct, or through relays: see ``remote_address``)."""

    public_key: PublicKey


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerDisconnected:
    """The direct link to ``public_key`` went down; ``reason`` says why."""

    public_key: PublicKey
    reason: str


SwarmEvent = PeerConnected | PeerDisconnected | MemberJoined | MemberLeft


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmStatistics:
    """Counters of a `Swarm` since it started."""

    peers: int
    """Direct links up now."""
    pending_handshakes: int
    """Incoming handshakes in progress now."""
    links_accepted: int
    """Incoming links that completed the handshake."""
    links_refused: int
    """Incoming links dropped: handshake failed or timed out, or too many pending."""
    dials: int
    """Outgoing link attempts (one per transport tried)."""
    dials_failed: int
    """Outgoing attempts that produced no authenticated link."""
    duplicate_links: int
    """Links closed because the same peer was already linked (simultaneous calls)."""
    events_dropped: int
    """Events lost by `Swarm.events` subscribers that did not keep up."""
    replication: ReplicaStatistics
    """Document replication counters."""
    signals: SignalStatistics
    """WebRTC signal counters (sent, delivered, rejected, forwarded, via the directory)."""
    relay: RelayStatistics
    """Circuits this node relays for others (now, opened, refused, bytes)."""
    probes: ProbeStatistics | None
    """Latency probes of this node's links (sent, answered, lost, bytes, rows
    published); None when probing is off (``SwarmConfig(probe=None)``)."""


class _Subscription:
    """One `Swarm.events` iterator: a bounded queue of events."""

    def __init__(self, size: int) -> None:
        send: MemoryObjectSendStream[SwarmEvent]
        receive: MemoryObjectReceiveStream[SwarmEvent]
        send, receive = anyio.create_memory_object_stream[SwarmEvent](size)
        self._send = send
        self._receive = receive
        self.dropped = 0

    def push(self, event: SwarmEvent) -> None:
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("an events() subscriber is not reading: %d dropped", self.dropped)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def close(self) -> None:
        self._send.close()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> SwarmEvent:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()
        await anyio.lowlevel.checkpoint()

    def __del__(self) -> None:
        self._send.close()
        self._receive.close()


class Swarm(anyio.AsyncContextManagerMixin):
    """A node of the swarm. Use it with ``async with``.

    Args:
        identity: this node's keypair; None loads ``data_dir/identity.key`` (creating
            it on first use) or, without ``data_dir``, generates a fresh one.
        transports: how to reach and be reached; None uses a `WebRTCTransport`
            (no STUN/TURN servers: give your own for NATs) and a `TcpTransport` on
            127.0.0.1 with an ephemeral port (a bootstrap endpoint others can call).
        signaling: signaling server URLs (``"ws://host:port"``) through which WebRTC
            offers reach nodes we have no link to yet. Once in the swarm, signals
            also travel through peers and the directory, so none is required.
        swarm_key: a 32-byte pre-shared key that makes the swarm private: nodes
            without it cannot complete a handshake with nodes that have it.
        data_dir: where the identity, the documents and the contacts persist; None:
            memory only.
        config: tuning, see `SwarmConfig`.
    """

    def __init__(
        self,
        identity: Identity | None = None,
        transports: Sequence[Transport] | None = None,
        signaling: Sequence[str] = (),
        swarm_key: bytes | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        config: SwarmConfig | None = None,
    ) -> None:
        if swarm_key is not None and len(swarm_key) != 32:
            raise ValueError(f"swarm_key must be 32 bytes, got {len(swarm_key)}")
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._identity = identity if identity is not None else self._load_identity()
        if transports is None:
            from crdtswarm.transport.tcp import TcpTransport  # default transports

            transports = [WebRTCTransport(), TcpTransport()]
        if not transports:
            raise ValueError("a swarm needs at least one transport")
        if isinstance(signaling, str):
            raise TypeError("signaling is a sequence of URLs, not one string")
        self._transports = list(transports)
        self._signaling = tuple(signaling)
        self._swarm_key = swarm_key
        self._config = config or SwarmConfig()
        self._mux_config = MuxConfig(
            initial_window_size=self._config.stream_window_size,
            max_streams=self._config.max_streams_per_peer,
            keepalive_interval=self._config.keepalive_interval,
            keepalive_timeout=self._config.peer_timeout,
        )
        self._peers: dict[PublicKey, Peer] = {}
        self._store: DocStore | None = None
        if self._data_dir is not None:
            compact_after = self._config.replica.compact_after
            self._store = DocStore(self._data_dir / _DOCS_FILE, compact_after=compact_after)
        self._replicator = Replicator(
            config=self._config.replica,
            on_protocol_error=self._drop_for_protocol_error,
            store=self._store,
            public_key=self.public_key,
            flooded=(DIRECTORY_DOC,),  # the control plane does not depend on the link graph
        )
        self._peers_changed = anyio.Event()
        self._closing = False
        self._contacts: dict[PublicKey, tuple[str, ...]] = self._load_contacts()
        self._directory: Directory | None = None
        self._directory_changed = anyio.Event()
        self._mesh_wakeup = anyio.Event()
        self._links_changed = anyio.Event()
        self._probe_wakeup = anyio.Event()
        self._prober: ProbeScheduler[PublicKey] | None = None
        self._rows: dict[PublicKey, dict[PublicKey, float]] = {}
        self._graph: LinkGraph[PublicKey] = LinkGraph({})  # of _rows, for routes and hubs
        # the latency mesh (MeshConfig.relay_hubs / near_peers)
        self._hubs: list[PublicKey] = []
        self._near: list[PublicKey] = []
        self._near_trial: list[PublicKey] = []
        self._near_tried: set[PublicKey] = set()
        self._next_election = 0.0
        self._rerouted: dict[PublicKey, float] = {}  # peer -> when we last re-routed it
        self._router: Router[PublicKey] = Router(self.public_key, self._config.routing)
        self._mesh = MeshPolicy(self.public_key, self._config.mesh)
        self._stream_handlers: dict[str, AppStreamHandler] = {}
        self._signaling_client = (
            SignalingClient(self._identity, self._signaling) if self._signaling else None
        )
        self._signals = SignalRouter(
            self._identity,
            deliver=self._deliver_signal,
            peers=lambda: self.peers,
            directory=lambda: self._directory,
            rows=lambda: self._rows,
            client=self._signaling_client,
            config=self._config.signals,
        )
        for transport in self._transports:
            if isinstance(transport, WebRTCTransport) and transport.signaler is None:
                transport.signaler = self._signals
        # -- relays: a RelayTransport in every swarm, and the relay service
        relay_transport = next((t for t in self._transports if isinstance(t, RelayTransport)), None)
        if relay_transport is None:
            relay_transport = RelayTransport()
            self._transports.append(relay_transport)
        if relay_transport.opener is None:
            relay_transport.opener = self._open_relay_stream
        self._relay_transport = relay_transport
        self._relay = RelayService(
            self.public_key,
            open_stream=self._open_relay_stream,
            transport=relay_transport,
            config=self._config.relay,
        )
        self._rpc_handlers: dict[str, RpcHandler] = {
            PING_METHOD: _echo,
            FORWARD_METHOD: self._signals.handle_forward,
        }
        self._subscriptions: weakref.WeakSet[_Subscription] = weakref.WeakSet()
        # attempts in progress, by (key, direct only): a call that may use relays
        # does not wait behind the mesh's direct-only dials (which can take several
        # dial timeouts) and vice versa
        self._dials: dict[tuple[PublicKey, bool], anyio.Event] = {}
        self._pending_handshakes = 0
        self._counters = dict.fromkeys(
            ("links_accepted", "links_refused", "dials", "dials_failed", "duplicate_links"), 0
        )
        self._events_dropped = 0
        self._addresses: list[str] = []
        self._task_group: TaskGroup | None = None
        self._log = ContextLogger(logger, self.public_key.short)

    def _load_identity(self) -> Identity:
        if self._data_dir is None:
            return Identity.generate()
        path = self._data_dir / _IDENTITY_FILE
        if path.exists():
            return Identity.load(path)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        identity = Identity.generate()
        identity.save(path)
        return identity

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Swarm]:
        _check_backend()
        async with contextlib.AsyncExitStack() as stack:
            if self._signaling_client is not None:
                await stack.enter_async_context(self._signaling_client)
                # registered before anyone learns our key: an offer to a node that
                # is not registered yet is answered "not here" and would be lost
                with anyio.move_on_after(self._config.signaling_timeout):
                    await self._signaling_client.wait_connected()
            async with self._run() as node:
                yield node

    @asynccontextmanager
    async def _run(self) -> AsyncGenerator[Swarm]:
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            tg.start_soon(self._signals.run)
            try:
                for transport in self._transports:
                    addresses = await tg.start(
                        transport.serve, self.public_key, self._on_incoming_link
                    )
                    self._addresses.extend(addresses)
                if self._store is not None:
                    for name in self._store.names():  # come back with every stored doc
                        self._replicator.doc(name)
                tg.start_soon(self._replicator.run)
                await self._start_directory(tg)
                self._log.info("node %s up at %s", self.public_key, self._addresses or "-")
                yield self
            finally:
                await self._shutdown()
                tg.cancel_scope.cancel()
        self._task_group = None
        self._replicator.close()
        if self._store is not None:
            self._store.close()

    async def _shutdown(self) -> None:
        self._closing = True  # from now on, new links are refused
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._config.close_timeout):
            if self._directory is not None and self._peers:
                self._directory.leave()  # others see MemberLeft now, not at expiry
                await self._replicator.drain()
            async with anyio.create_task_group() as tg:
                for peer in list(self._peers.values()):
                    tg.start_soon(peer.aclose)
            # let the connection tasks report PeerDisconnected before subscriptions end
            while self._peers:
                self._peers_changed = anyio.Event()
                await self._peers_changed.wait()
        for subscription in list(self._subscriptions):
            self._events_dropped += subscription.dropped
            subscription.close()

    # -- directory and mesh ------------------------------------------------------------

    async def _start_directory(self, tg: TaskGroup) -> None:
        doc = self._replicator.doc(DIRECTORY_DOC)
        self._directory = Directory(doc, self._identity, config=self._config.directory)
        doc.observe(lambda _event: self._directory_changed.set())
        self._publish_member()
        self._directory.refresh()
        tg.start_soon(self._run_directory)
        tg.start_soon(self._run_links)
        tg.start_soon(self._run_probes, tg)
        if self._config.auto_mesh:
            tg.start_soon(self._run_mesh, tg)

    def _publish_member(self) -> None:
        if self._directory is not None:
            schemes = sorted({t.scheme for t in self._transports})
            self._directory.publish_member(self._addresses, schemes)

    async def _run_directory(self) -> None:
        directory = self._directory
        assert directory is not None
        config = self._config.directory
        refresh_every = config.member_ttl / 3
        maintain_every = min(refresh_every, config.signal_ttl)
        last_publish = last_maintain = anyio.current_time()
        while True:
            with anyio.move_on_after(maintain_every / 2):
                await self._directory_changed.wait()
            self._directory_changed = anyio.Event()
            now = anyio.current_time()
            if now - last_publish >= refresh_every:
                self._publish_member()
                last_publish = now
            if now - last_maintain >= maintain_every:
                directory.maintain()
                last_maintain = now
            for event in directory.refresh():
                if event.public_key != self.public_key:
                    self._emit(event)
                if isinstance(event, MemberLeft):
                    self._mesh.forget([event.public_key])
            self._signals.poll_directory()
            # a member that left takes its row with it: routes avoid it at once
            members = directory.members
            rows = {
                author: row
                for author, row in directory.latency_rows().items()
                if author in members or author == self.public_key
            }
            if rows != self._rows:  # the link graph changed: route updates along the new one
                self._rows = rows
                self._graph = LinkGraph.from_rows(rows)
                self._replicator.set_link_rows(rows)
                self._router.update(self._graph)
                self._reroute_relayed()
            self._mesh_wakeup.set()

    async def _run_links(self) -> None:
        """Publish our latency row (peers and round-trip times) when our links change.

        The rows of all members make the link graph along which document updates
        travel (see `crdtswarm.sync.replica`). A row is republished when a link comes
        or goes, when a round-trip time moves by more than a quarter (and 2 ms), and
        every third of ``latency_ttl`` so that it does not expire.
        """
        directory = self._directory
        assert directory is not None
        refresh_every = self._config.directory.latency_ttl / 3
        published: dict[PublicKey, float] | None = None
        last_publish = -math.inf
        while True:
            with anyio.move_on_after(refresh_every):
                await self._links_changed.wait()
            await anyio.sleep_until(
                max(
                    anyio.current_time() + self._config.link_publish_delay,
                    last_publish + self._config.link_publish_interval,
                )
            )  # gather a burst of changes, and publish at a bounded rate
            self._links_changed = anyio.Event()
            prober = self._prober
            row = {
                k: p.rtt
                for k, p in self._direct_peers().items()
                if p.rtt is not None and not (prober and k in prober and prober.estimate(k).is_down)
            }
            now = anyio.current_time()
            if published is None or now - last_publish >= refresh_every or _moved(published, row):
                directory.publish_latency(row)
                published, last_publish = row, now

    async def _measure_link(self, peer: Peer) -> None:
        """Measure a new link's round-trip time, then have our row republished."""
        self._probe_wakeup.set()
        with contextlib.suppress(RpcError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await peer.ping(timeout=self._config.peer_timeout)
        self._links_changed.set()

    async def _run_probes(self, tg: TaskGroup) -> None:
        """Probe every direct link on the schedule of `crdtswarm.protocol.probe`.

        Each answer feeds ``peer.rtt`` (and the scheduler's estimate); `_run_links`
        republishes our row when it moved enough; a link the scheduler finds down
        (probes lost in a row) leaves the row, so routes avoid it.
        """
        config = self._config.probe
        if config is None:
            return
        prober = self._prober = ProbeScheduler[PublicKey](config, rng=self._mesh.rng)
        while True:
            now = anyio.current_time()
            direct = self._direct_peers()
            for key in prober.links:
                if key not in direct:
                    prober.remove_link(key, now)
            for key in direct:
                if key not in prober:
                    prober.add_link(key, now)
            was_down = {k for k in prober.links if prober.estimate(k).is_down}
            prober.handle_timer(now)
            if {k for k in prober.links if prober.estimate(k).is_down} != was_down:
                self._links_changed.set()
            for key in prober.probes_due(now):
                tg.start_soon(self._probe, prober, direct[key], prober.probe_sent(key, now))
            timer = prober.get_timer()
            with anyio.move_on_after(max(0.0, timer - now) if timer is not None else 60.0):
                await self._probe_wakeup.wait()
            self._probe_wakeup = anyio.Event()

    async def _probe(self, prober: ProbeScheduler[PublicKey], peer: Peer, probe_id: int) -> None:
        try:
            await peer.ping(timeout=2 * prober.config.max_timeout)
        except (RpcError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the scheduler times the probe out by itself
        prober.probe_answered(probe_id, anyio.current_time())
        self._links_changed.set()
        self._probe_wakeup.set()

    async def _run_mesh(self, tg: TaskGroup) -> None:
        while not self._closing:
            self._trim_mesh(tg)
            directory = self._directory
            if directory is not None:
                # the passive view: the directory's members, and the nodes we have been
                # linked to (a node shed before it received the directory still knows them)
                candidates = dict(self._contacts)
                candidates.update((k, m.addresses) for k, m in directory.members.items())
                if not self._peers:  # cut off: those that left may only have restarted
                    for key in directory.departed:
                        candidates.setdefault(key, ())
                preferred = self._latency_mesh(candidates)
                chosen = self._mesh.plan(
                    anyio.current_time(), candidates, self._direct_peers(), preferred
                )
                for key in chosen:
                    tg.start_soon(self._mesh_dial, key, candidates[key])
            with anyio.move_on_after(self._config.mesh.tick_interval):
                await self._mesh_wakeup.wait()
            self._mesh_wakeup = anyio.Event()

    def _latency_mesh(self, members: Mapping[PublicKey, object]) -> list[PublicKey]:
        """The hubs and near peers to link to (``MeshConfig.relay_hubs`` / ``near_peers``).

        Every ``election_interval``: elect the hubs from the link graph (incumbents
        sticky), keep as near peers the lowest-RTT links that are not hubs, and pick
        one new near candidate to try (`crdtswarm.protocol.topology`).
        """
        config = self._config.mesh
        if not config.relay_hubs:
            return []
        now = anyio.current_time()
        if now >= self._next_election:
            self._next_election = now + config.election_interval
            hubs = elect_relays(self._graph, config.relay_hubs, incumbents=self._hubs)
            self._hubs = [h for h in hubs if h in members or h == self.public_key]
            self._near, self._near_trial = [], []
            if config.near_peers:
                direct = self._direct_peers()
                measured = {
                    k: p.rtt for k, p in direct.items() if p.rtt is not None and k not in hubs
                }
                self._near = nearest(measured, config.near_peers)
                self._near_tried.intersection_update(members)  # bounded by the members
                exclude = {*direct, *self._near_tried}
                trial = near_candidates(self._rows, self.public_key, hubs, 1, exclude=exclude)
                self._near_tried.update(trial)
                self._near_trial = trial
        return [*self._hubs, *self._near, *self._near_trial]

    def _deliver_signal(self, sender: PublicKey, payload: bytes) -> None:
        for transport in self._transports:
            if isinstance(transport, WebRTCTransport) and transport.signaler is self._signals:
                transport.receive_signal(sender, payload)

    def _remember_contact(self, key: PublicKey, channel: SecureChannel) -> None:
        address = channel.extra(LinkAttribute.remote_address, None)
        if is_relayed(channel):  # relay paths go stale: not worth keeping
            address = None
        addresses = (address,) if channel.is_initiator and address else ()
        previous = self._contacts.pop(key, ())  # re-inserted last: the most recent
        self._contacts[key] = addresses or previous
        while len(self._contacts) > _MAX_CONTACTS:  # forget the oldest
            del self._contacts[next(iter(self._contacts))]
        self._save_contacts()

    def _load_contacts(self) -> dict[PublicKey, tuple[str, ...]]:
        """The nodes we were linked to before a restart (``data_dir/contacts.json``).

        A node that restarts before the directory reached it, or after everybody it
        knew restarted too, would otherwise know nobody to call.
        """
        if self._data_dir is None:
            return {}
        path = self._data_dir / _CONTACTS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            contacts = {
                PublicKey.parse(item["key"]): tuple(str(a) for a in item["addresses"])
                for item in raw[-_MAX_CONTACTS:]
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.warning("ignoring unreadable contacts file %s: %s", path, exc)
            return {}
        return contacts

    def _save_contacts(self) -> None:
        if self._data_dir is None:
            return
        path = self._data_dir / _CONTACTS_FILE
        items = [{"key": str(k), "addresses": list(a)} for k, a in self._contacts.items()]
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(items), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            self._log.warning("cannot save contacts to %s: %s", path, exc)

    def _trim_mesh(self, tg: TaskGroup) -> None:
        """Shed links that others opened to us beyond ``max_peers`` plus some slack.

        Like HyParView's active view: a node everyone calls (a bootstrap member) would
        otherwise end up linked to the whole swarm. The shed peers back off from us
        (they see the "mesh full" reason) and pick other members instead.
        """
        config = self._config.mesh
        if self.public_key in self._hubs:
            return  # an elected relay hub accepts everybody
        limit = config.max_peers
        limit += max(1, limit // 2) + config.relay_hubs + config.near_peers
        peers = self._direct_peers()
        surplus = len(peers) - limit
        if surplus <= 0:
            return
        oldest = anyio.current_time() - self._config.mesh.min_link_age
        incoming = [
            p
            for p in peers.values()
            if not p.statistics().is_initiator and (p.connected_at or 0.0) <= oldest
        ]
        self._mesh.rng.shuffle(incoming)
        for peer in incoming[:surplus]:
            self._log.debug("mesh full: shedding %s", peer.public_key.short)
            tg.start_soon(peer.aclose, ErrorCode.REFUSED, _MESH_FULL)

    async def _mesh_dial(self, key: PublicKey, addresses: tuple[str, ...]) -> None:
        options: list[str | None] = [a for a in addresses if self._can_dial(a)]
        if any(t.can_dial(None) for t in self._transports):
            options.append(None)
        for address in options:
            try:
                await self._call(key, address, self._config.dial_timeout, direct=True)
            except (ConnectError, TimeoutError, ValueError) as exc:
                self._log.debug("mesh dial %s at %s failed: %s", key.short, address, exc)
                continue
            self._mesh.dial_succeeded(key)
            return
        self._mesh.dial_failed(key, anyio.current_time())
        self._mesh_wakeup.set()

    def _can_dial(self, address: str) -> bool:
        return any(t.can_dial(address) for t in self._transports)

    # -- properties ------------------------------------------------------------------

    @property
    def identity(self) -> Identity:
        """This node's keypair."""
        return self._identity

    @property
    def public_key(self) -> PublicKey:
        """This node's public key: its address in the swarm."""
        return self._identity.public_key

    @property
    def addresses(self) -> list[str]:
        """Where this node can be dialled directly, e.g. ``["tcp://127.0.0.1:4242"]``."""
        return list(self._addresses)

    def route(self, public_key: PublicKey | str) -> Route[PublicKey]:
        """The best path to ``public_key`` known from the members' latency rows.

        ``route.hops`` are the relays (empty when direct), ``route.latency`` the
        expected round trip in seconds, or None when no path through at most two
        relays is known. Routes switch only to clearly better paths (hysteresis).
        """
        key = PublicKey.parse(public_key) if isinstance(public_key, str) else public_key
        return self._router.route(key)

    @property
    def relay_hubs(self) -> list[PublicKey]:
        """The relay hubs this node elected last (``MeshConfig.relay_hubs``; empty when off)."""
        return list(self._hubs)

    @property
    def members(self) -> set[PublicKey]:
        """Every node the directory knows as a current member (this node included)."""
        if self._directory is None:
            return set()
        return set(self._directory.members)

    @property
    def directory(self) -> Directory | None:
        """The membership directory (None before the swarm starts)."""
        return self._directory

    @property
    def peers(self) -> dict[PublicKey, Peer]:
        """The nodes this node is linked to now, directly or through a relay (a snapshot)."""
        return {key: peer for key, peer in self._peers.items() if peer.is_connected}

    def statistics(self) -> SwarmStatistics:
        """A snapshot of this node's counters."""
        dropped = self._events_dropped + sum(s.dropped for s in self._subscriptions)
        return SwarmStatistics(
            peers=len(self.peers),
            pending_handshakes=self._pending_handshakes,
            events_dropped=dropped,
            replication=self._replicator.statistics(),
            signals=self._signals.statistics(),
            relay=self._relay.statistics(),
            probes=self._prober.statistics() if self._prober is not None else None,
            **self._counters,
        )

    @property
    def config(self) -> SwarmConfig:
        """This node's tuning."""
        return self._config

    # -- documents -------------------------------------------------------------------

    def doc(self, name: str) -> pycrdt.Doc[Any]:
        """The `pycrdt.Doc` called ``name``, replicated with every peer that opens it.

        The same object is returned on every call. Edits made to it locally reach
        every node that opened a document of that name and is linked to this one,
        directly or through other nodes that have it open; edits made there arrive
        here. On every (re)connection the two sides exchange what the other lacks.

        Raises:
            ValueError: if the name is empty or longer than 256 UTF-8 bytes.
        """
        return self._replicator.doc(name)

    async def _drop_for_protocol_error(self, key: PublicKey, error: Exception) -> None:
        peer = self._peers.get(key)
        if peer is not None:
            self._log.warning("dropping %s: %s", key.short, error)
            await peer.aclose(ErrorCode.PROTOCOL_ERROR, str(error)[:200])

    # -- events ----------------------------------------------------------------------

    def events(self) -> AsyncIterator[SwarmEvent]:
        """Subscribe to this node's events from now on.

        `PeerConnected` / `PeerDisconnected` for links, `MemberJoined` /
        `MemberLeft` for the directory's members (others than this node).

        Each call returns an independent iterator with a bounded queue
        (`SwarmConfig.event_queue_size`); a subscriber that does not read loses
        new events (logged). Iteration ends when the swarm closes.
        """
        subscription = _Subscription(self._config.event_queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def _emit(self, event: SwarmEvent) -> None:
        self._log.info("%s %s", type(event).__name__, event.public_key.short)
        for subscription in list(self._subscriptions):
            subscription.push(event)

    # -- handlers --------------------------------------------------------------------

    def handle(self, protocol: str, handler: AppStreamHandler) -> None:
        """Serve incoming streams opened for ``protocol`` with ``handler(stream, remote_key)``.

        The stream is closed when the handler returns; an exception in the handler
        resets the stream and is logged. Registering again replaces the handler.

        Raises:
            ValueError: if the protocol name is empty or longer than 59 bytes.
        """
        if (
            not protocol
            or len((APP_PREFIX + protocol).encode()) > self._mux_config.max_protocol_name_size
        ):
            raise ValueError(f"protocol names are 1 to 59 bytes: {protocol!r}")
        self._stream_handlers[protocol] = handler

    def handle_rpc(self, method: str, handler: RpcHandler) -> None:
        """Answer RPC calls to ``method`` with ``await handler(payload, remote_key)``.

        The handler returns the answer's bytes; raising `crdtswarm.errors.RpcError`
        sends its code and message; any other exception answers ``INTERNAL_ERROR``.
        """
        if method.startswith("crdtswarm."):
            raise ValueError("method names starting with 'crdtswarm.' are reserved")
        self._rpc_handlers[method] = handler

    # -- dialling --------------------------------------------------------------------

    async def call(
        self, public_key: PublicKey | str, address: str | None = None, timeout: float = 30.0
    ) -> Peer:
        """Link to the node ``public_key`` (at ``address`` when given) and return its `Peer`.

        Returns at once when a link is already up (a relayed one is upgraded when
        ``address`` is a direct address). Concurrent calls to the same node share
        one attempt. Without ``address``, relays are tried too: the route's relays
        first (`route`), then the transports that dial by key, then up to three
        direct peers as relays (those whose latency rows show a link to the node
        first).

        Raises:
            TimeoutError: no authenticated link within ``timeout`` seconds.
            ConnectError: no transport could reach the node, or the handshake
                failed; ``__cause__`` has the last underlying error.
            crdtswarm.errors.IdentityMismatchError: (as ``__cause__`` of
                ConnectError) the address answered with another identity.
            ValueError: the key is malformed, is our own, or no transport
                understands ``address``.
        """
        return await self._call(public_key, address, timeout, direct=False)

    async def _call(
        self, public_key: PublicKey | str, address: str | None, timeout: float, *, direct: bool
    ) -> Peer:
        """`call`; with ``direct``, only a direct link will do (the mesh's dials)."""
        key = PublicKey.parse(public_key) if isinstance(public_key, str) else public_key
        if key == self.public_key:
            raise ValueError("a node cannot call itself")
        candidates = [t for t in self._transports if t.can_dial(address)]
        if address is not None and not candidates:
            raise ValueError(f"no transport of this node can dial {address!r}")
        self._require_running()
        if self._closing:
            raise ConnectError("the swarm is shutting down")
        direct = direct or (address is not None and not address.startswith(f"{RELAY_SCHEME}://"))
        with anyio.fail_after(timeout):
            while True:
                peer = self._linked(key, direct=direct)
                if peer is not None:
                    return peer
                pending = self._dials.get((key, direct))
                if pending is None:
                    break
                await pending.wait()
                if (peer := self._linked(key, direct=direct)) is not None:
                    return peer
                # the shared attempt failed: try ourselves (maybe with another address)
            done = self._dials[key, direct] = anyio.Event()
            try:
                return await self._dial(key, address, candidates, relay=not direct)
            finally:
                del self._dials[key, direct]
                done.set()

    async def _dial(
        self,
        key: PublicKey,
        address: str | None,
        transports: list[Transport],
        *,
        relay: bool = False,
    ) -> Peer:
        attempts: list[tuple[Transport, str | None]] = [(t, address) for t in transports]
        if relay and address is None:
            attempts = self._with_relays(key, attempts)
        if not attempts:
            raise ConnectError(
                f"no address known for {key.short}: pass address= (one of {key.short}'s "
                f"node.addresses) or use a transport that dials by key"
            )
        errors: list[BaseException] = []
        if relay and len(attempts) > 1:
            peer = await self._dial_staggered(key, attempts, errors)
            if peer is not None:
                return peer
        else:
            for transport, where in attempts:
                try:
                    return await self._attempt(key, transport, where)
                except _DialFailed as failed:
                    errors.append(failed.error)
        # the node's own answer (a handshake error) says most
        error: BaseException | None = next(
            (e for e in errors if isinstance(e, RemoteProtocolError)), None
        )
        error = error or (errors[-1] if errors else None)
        raise ConnectError(f"could not link to {key.short}: {error}") from error

    async def _dial_staggered(
        self,
        key: PublicKey,
        attempts: list[tuple[Transport, str | None]],
        errors: list[BaseException],
    ) -> Peer | None:
        """Try ``attempts`` in order, each one started when the previous failed or stalled.

        The next attempt starts after ``SwarmConfig.dial_stagger`` seconds at the
        latest (like Happy Eyeballs): a direct attempt that hangs (WebRTC behind a
        symmetric NAT waits for ICE to fail) does not keep the relays from being
        tried. The first link up wins; the others are cancelled.
        """
        winner: Peer | None = None

        async def run(transport: Transport, where: str | None, failed: anyio.Event) -> None:
            nonlocal winner
            try:
                peer = await self._attempt(key, transport, where)
            except _DialFailed as exc:
                errors.append(exc.error)
                failed.set()
                return
            except ValueError as exc:  # an address this transport refuses: not fatal here
                errors.append(exc)
                failed.set()
                return
            if winner is None:
                winner = peer
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for transport, where in attempts:
                failed = anyio.Event()
                tg.start_soon(run, transport, where, failed)
                with anyio.move_on_after(self._config.dial_stagger):
                    await failed.wait()
        return winner

    async def _attempt(self, key: PublicKey, transport: Transport, where: str | None) -> Peer:
        """One dial and handshake; raises `_DialFailed` with the reason."""
        self._counters["dials"] += 1
        try:
            link = await transport.dial(key, where)
        except (ConnectError, OSError) as exc:
            self._log.debug("dial %s via %s failed: %s", key.short, transport.scheme, exc)
            self._counters["dials_failed"] += 1
            raise _DialFailed(exc) from exc
        try:
            channel = await establish(
                link,
                self._identity,
                initiator=True,
                expected_remote=key,
                swarm_key=self._swarm_key,
                timeout=self._config.handshake_timeout,
            )
        except (
            RemoteProtocolError,
            anyio.BrokenResourceError,
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            OSError,
        ) as exc:
            self._log.info("handshake with %s failed: %s", key.short, exc)
            self._counters["dials_failed"] += 1
            raise _DialFailed(exc) from exc
        task_group = self._require_running()
        with anyio.CancelScope(shield=True):  # a link that is up is not thrown away
            peer: Peer = await task_group.start(self._run_connection, channel)
        if transport is self._relay_transport:
            task_group.start_soon(self._upgrade, key)
        return peer

    def _reroute_relayed(self) -> None:
        """Re-dial the relayed links we dialled whose route now goes through other relays.

        The Router switches routes only to clearly better paths (hysteresis), so this
        follows a relay that degraded or died. The new circuit replaces the old one
        (`_keeps_existing_link`): new streams use it, streams on the old one end with
        a reset. At most one attempt per peer every `_REROUTE_INTERVAL` seconds.
        """
        task_group = self._task_group
        if task_group is None or self._closing:
            return
        now = anyio.current_time()
        for gone in self._rerouted.keys() - self._peers.keys():  # bounded by the peers
            del self._rerouted[gone]
        for key, peer in list(self._peers.items()):
            connection = peer._connection
            if connection is None or not peer.is_connected or not _is_relayed_peer(peer):
                continue
            if not connection.channel.is_initiator:
                continue  # the end that dialled the circuit re-routes it
            route = self._router.route(key)
            try:
                hops, _ = parse_relay_address(peer.remote_address or "")
            except ValueError:
                continue
            if route.latency is None or not route.hops or route.hops == hops:
                continue
            if now - self._rerouted.get(key, -math.inf) < _REROUTE_INTERVAL:
                continue
            self._rerouted[key] = now
            task_group.start_soon(self._reroute, key, route.hops)

    async def _reroute(self, key: PublicKey, hops: tuple[PublicKey, ...]) -> None:
        address = relay_address(hops, key)
        self._log.info("re-routing %s through %s", key.short, address)
        try:
            with anyio.fail_after(self._config.dial_timeout):
                await self._dial(key, address, [self._relay_transport])
        except (ConnectError, TimeoutError, ValueError) as exc:
            self._log.info("re-route of %s through %s failed: %s", key.short, address, exc)

    async def _upgrade(self, key: PublicKey) -> None:
        """After a relayed link to ``key``: try a direct one in the background.

        When it comes up it replaces the relayed link (a direct link always wins, see
        `_keeps_existing_link`): new streams use it, streams on the relayed link end
        with a reset, and the probes put the direct link in our latency row. A failed
        attempt backs off like the mesh's dials (`MeshPolicy.dial_failed`).
        """
        if not any(t.can_dial(None) for t in self._transports):
            return
        if not self._mesh.may_dial(key, anyio.current_time()):
            return
        try:
            await self._call(key, None, self._config.dial_timeout, direct=True)
        except (ConnectError, TimeoutError, ValueError) as exc:
            self._log.debug("no direct link to %s (staying relayed): %s", key.short, exc)
            self._mesh.dial_failed(key, anyio.current_time())
        else:
            self._log.info("upgraded the link to %s from relayed to direct", key.short)
            self._mesh.dial_succeeded(key)

    # -- relays (crdtswarm.relay) ---------------------------------------------------------

    def _linked(self, key: PublicKey, *, direct: bool) -> Peer | None:
        """The peer ``key`` when linked (only by a direct link when ``direct``)."""
        peer = self._peers.get(key)
        if peer is None or not peer.is_connected or (direct and _is_relayed_peer(peer)):
            return None
        return peer

    def _direct_peers(self) -> dict[PublicKey, Peer]:
        """`peers` without the relayed links: the mesh's active view."""
        return {k: p for k, p in self.peers.items() if not _is_relayed_peer(p)}

    def _with_relays(
        self, key: PublicKey, attempts: list[tuple[Transport, str | None]]
    ) -> list[tuple[Transport, str | None]]:
        """``attempts`` (the dials by key) with relayed dials before and after them.

        First the route's relays, when the route has any; last, at most 3 of our
        direct peers as single relays: those whose latency row (or the target's)
        shows a link to ``key``, cheapest first, then the others by round-trip time
        (the route may not know a path yet, or any more; a peer without a link to
        ``key`` refuses at once).
        """
        transport = self._relay_transport
        hops = self.route(key).hops
        first = [(transport, relay_address(hops, key))] if hops else []
        peers = {k: p.rtt for k, p in self._direct_peers().items()}
        tried = hops if len(hops) == 1 else ()
        last = [
            (transport, relay_address((relay,), key))
            for relay in fallback_relays(key, peers, self._rows, exclude=tried)
        ]
        return [*first, *attempts, *last]

    async def _open_relay_stream(self, key: PublicKey) -> MuxStream:
        """A relay substream on our direct link to ``key`` (`crdtswarm.relay.StreamOpener`)."""
        peer = self._linked(key, direct=True)
        connection = peer._connection if peer is not None else None
        if connection is None:
            raise ConnectError(f"no direct link to {key.short}")
        return await connection.mux.open_stream(RELAY_PROTOCOL)

    def _require_running(self) -> TaskGroup:
        if self._task_group is None:
            raise RuntimeError("the swarm is not running: use `async with Swarm(...)`")
        return self._task_group

    # -- streams ---------------------------------------------------------------------

    async def open_stream(self, public_key: PublicKey | str, protocol: str) -> MuxStream:
        """Open an application stream to ``public_key`` for ``protocol``.

        Links to the node first when needed, as `call` without an address does
        (through the route's relays, by key on transports that can, or through a
        peer linked to the node).

        Raises:
            ConnectError: the node cannot be reached.
            crdtswarm.errors.StreamResetError: (on first use of the stream) the node
                has no handler for ``protocol``.
        """
        key = PublicKey.parse(public_key) if isinstance(public_key, str) else public_key
        peer = self._peers.get(key)
        if peer is None or not peer.is_connected:
            peer = await self.call(key)
        return await peer.open_stream(protocol)

    # -- incoming links ----------------------------------------------------------------

    async def _on_incoming_link(self, link: Link) -> None:
        if self._closing:
            await anyio.aclose_forcefully(link)
            return
        if self._pending_handshakes >= self._config.max_pending_handshakes:
            self._log.warning("too many handshakes in progress: dropping an incoming link")
            self._counters["links_refused"] += 1
            await anyio.aclose_forcefully(link)
            return
        self._pending_handshakes += 1
        try:
            channel = await establish(
                link,
                self._identity,
                initiator=False,
                swarm_key=self._swarm_key,
                timeout=self._config.handshake_timeout,
            )
        except (
            RemoteProtocolError,
            TimeoutError,
            anyio.BrokenResourceError,
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            OSError,
        ) as exc:
            self._log.info("incoming handshake failed: %s", exc or type(exc).__name__)
            self._counters["links_refused"] += 1
            return
        finally:
            self._pending_handshakes -= 1
        self._counters["links_accepted"] += 1
        with contextlib.suppress(ConnectError):  # we started shutting down meanwhile
            await self._run_connection(channel)

    # -- connections -------------------------------------------------------------------

    async def _run_connection(
        self,
        channel: SecureChannel,
        *,
        task_status: TaskStatus[Peer] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        key = channel.remote_key
        if self._closing:  # a handshake that finished while we shut down
            await channel.aclose()
            raise ConnectError("the swarm is shutting down")
        peer = self._peers.get(key)
        if peer is not None and peer.is_connected:
            if _keeps_existing_link(peer, channel):
                self._log.debug("duplicate link with %s: keeping the existing one", key.short)
                self._counters["duplicate_links"] += 1
                await channel.aclose()
                task_status.started(peer)
                return
        elif peer is None:
            peer = self._peers[key] = Peer(key, rpc_handlers=self._rpc_handlers)
        reason = "link closed"
        connection: _Connection | None = None
        try:
            mux = MuxConnection(
                channel,
                is_initiator=channel.is_initiator,
                accept=lambda protocol: self._accept(peer, protocol),
                config=dataclasses.replace(
                    self._mux_config,
                    max_message_size=channel.max_message_size,
                    max_pending_frames_size=2 * channel.max_message_size,
                ),
                name=key.short,
            )
            async with mux, anyio.create_task_group() as tg:
                connection = _Connection(channel, mux, tg)
                old = peer._attach(connection)
                task_status.started(peer)
                if old is not None and not old.mux.is_closed:
                    self._log.debug("duplicate link with %s: replacing the older one", key.short)
                    self._counters["duplicate_links"] += 1
                    tg.start_soon(old.mux.aclose, ErrorCode.NO_ERROR, "duplicate link")
                elif old is None:
                    self._emit(PeerConnected(public_key=key))
                self._remember_contact(key, channel)
                tg.start_soon(self._measure_link, peer)
                tg.start_soon(
                    self._replicator.run_peer, key, lambda: mux.open_stream(SYNC_PROTOCOL)
                )
                await mux.wait_closed()
                reason = _describe(mux.error)
                tg.cancel_scope.cancel()
        finally:
            detached = connection is not None and peer._detach(connection)
            if peer._connection is None and self._peers.get(key) is peer:
                del self._peers[key]
                self._peers_changed.set()
            if detached:
                self._links_changed.set()
                self._probe_wakeup.set()
                self._emit(PeerDisconnected(public_key=key, reason=reason))
                if _MESH_FULL in reason:  # it shed us: look elsewhere for a while
                    self._mesh.dial_failed(key, anyio.current_time())
                self._mesh_wakeup.set()

    def _accept(self, peer: Peer, protocol: str) -> StreamHandler | None:
        if protocol == RPC_PROTOCOL:
            return lambda stream: self._serve_rpc(stream, peer.public_key)
        if protocol == SYNC_PROTOCOL:
            return lambda stream: self._replicator.serve_incoming(stream, peer.public_key)
        if protocol == RELAY_PROTOCOL:
            return lambda stream: self._relay.handle_stream(stream, peer.public_key)
        if protocol.startswith(APP_PREFIX):
            handler = self._stream_handlers.get(protocol[len(APP_PREFIX) :])
            if handler is not None:
                return lambda stream: handler(stream, peer.public_key)
        return None

    async def _serve_rpc(self, stream: MuxStream, remote_key: PublicKey) -> None:
        async with anyio.create_task_group() as tg:
            channel = RpcChannel(
                stream, remote_key=remote_key, handlers=self._rpc_handlers, task_group=tg
            )
            await channel.serve()
            tg.cancel_scope.cancel()


def _moved(published: dict[PublicKey, float], row: dict[PublicKey, float]) -> bool:
    """Whether ``row`` differs enough from the ``published`` one to publish it again."""
    if published.keys() != row.keys():
        return True
    return any(abs(row[k] - old) > max(0.002, old / 4) for k, old in published.items())


def _is_relayed_peer(peer: Peer) -> bool:
    connection = peer._connection
    return connection is not None and is_relayed(connection.channel)


_REROUTE_INTERVAL = 5.0  # seconds between two re-routes of a relayed link to one peer


class _DialFailed(Exception):
    """One attempt of `Swarm._dial` failed with ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _keeps_existing_link(peer: Peer, channel: SecureChannel) -> bool:
    """Whether a new link ``channel`` to a linked ``peer`` loses to the existing one.

    A direct link beats a relayed one; a relayed link dialled by the same end as
    the existing relayed one replaces it (a re-route to a better path); otherwise
    the one the smaller key dialled wins. Both ends compute the same answer.
    """
    connection = peer._connection
    if connection is not None and not connection.mux.is_closed:
        if is_relayed(connection.channel) != is_relayed(channel):
            return is_relayed(channel)
        if is_relayed(channel) and connection.channel.is_initiator == channel.is_initiator:
            return False
    return peer._is_preferred_link or not _is_preferred(channel)


async def _echo(payload: bytes, remote_key: PublicKey) -> bytes:
    return payload


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "link closed"
    if isinstance(error, TimeoutError):
        return "keepalive timeout"
    cause = error.__cause__
    text = str(error) or type(error).__name__
    if cause is not None and str(cause):
        text += f": {cause}"
    return text


def _check_backend() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise UnsupportedBackendError(
            "crdtswarm needs anyio's asyncio backend (aiortc is asyncio-only)"
        ) from None
