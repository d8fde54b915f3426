"""Document replication: every open `pycrdt.Doc` kept in sync with every linked peer.

`Replicator` drives one `crdtswarm.sync.protocol.SyncSession` per (peer, document).
Each side of a link opens one outgoing substream (`PROTOCOL`) for everything it
sends and reads the peer's. A message on that stream is a 4-byte length, then the
document name (lib0 var-string), then one y-protocols message (sync step 1, step 2,
update, awareness).

Rules:

1. Anti-entropy. When a link comes up, and when a document is opened, we send
   SyncStep1 (our state vector) for every open document to every peer; a peer that
   has the document open answers with SyncStep2 (what we lack) and its own
   SyncStep1. A peer that does not have the document ignores it.
2. Incremental updates travel as *routed updates* (rule 3), a message of ours on
   the same stream: ``ROUTED`` (uvarint 100, a type y-protocols does not use), the
   first 4 bytes of the key of the node that put the update into the swarm (its
   *origin*), then the update (var-bytes). A change to a document that we did not
   receive as a routed update (a local edit, or a step 2 from peer P) gets us as
   its origin; it is never sent back to P: no echo. pycrdt gives no transaction
   origin, so the replicator records what it is applying while
   `SyncSession.receive_message` runs (the doc observer fires synchronously
   inside it).
3. Link-state multicast. With a link graph (built from the members' latency rows,
   see `Replicator.set_link_rows` and `crdtswarm.protocol.routing`), an update from
   origin O goes only to our children in the shortest-path tree rooted at O, plus
   the peers whose link to us the graph does not show yet; so each node receives
   it once, as fast as the network allows. We fall back to every peer but the
   sender (flooding) when there is no graph, O is unknown or ambiguous, we are not
   in O's tree, a child of ours is not linked to us, or the update came over a
   graph link from a node that is not our parent (the views disagree); such an
   update is then sent as ``FLOODED`` (uvarint 101, same layout), and every node
   that receives it floods it on (a tree with a hole cannot be patched locally:
   the nodes below the hole would not know). Documents
   named in ``flooded`` (the directory, which carries the rows themselves) are
   always flooded. Routed updates are forwarded whether or not we have the
   document open (after a structural check), so replicas separated by other nodes
   still meet. A bounded cache of recently seen routed updates (origin, document,
   hash) stops loops and duplicates when views disagree.
4. Bursts. An update after a quiet spell is sent at once; updates that follow
   within ``batch_interval`` of the last send are gathered and merged into one
   (per document and origin).
5. Durability. With a `crdtswarm.sync.store.DocStore`, a document is loaded from it
   when opened and every change (local or remote) is appended to it before the
   change is sent anywhere.
6. Bounds. Updates queued for a peer are bounded by ``max_queued_size``; beyond
   that they are dropped and the peer is sent the full document state instead
   (idempotent). Incoming messages are bounded by ``max_message_size``. Replies
   (SyncStep2) queued for a peer are bounded per document by the session; a peer
   that makes them overflow (a SyncStep1 flood) is dropped.
7. Hostile input. A malformed message or an update pycrdt cannot apply raises
   `crdtswarm.errors.FrameError` / `crdtswarm.errors.SyncError`; the local document is
   untouched, the error is logged and ``on_protocol_error`` drops the link.
8. Repair. When a link goes down, we send our state vectors to every peer left
   (what was in flight on that link may have been the only way an update had to
   part of the tree), and every ``anti_entropy_interval`` to one peer chosen at
   random: whatever a disagreement between link graphs kept from us or from it is
   exchanged then.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import pycrdt

from crdtswarm.errors import (
    ErrorCode,
    FrameError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamResetError,
    SyncError,
)
from crdtswarm.log import ContextLogger
from crdtswarm.protocol.routing import LinkGraph
from crdtswarm.protocol.wire import Reader, encode_uvarint, encode_var_bytes, encode_var_string
from crdtswarm.sync.protocol import SyncSession, validate_update
from crdtswarm.transport.framing import FrameDecoder, encode_frame

if TYPE_CHECKING:
    from crdtswarm.identity import PublicKey
    from crdtswarm.mux import MuxStream
    from crdtswarm.sync.store import DocStore

__all__ = [
    "FLOODED",
    "ORIGIN_SIZE",
    "PROTOCOL",
    "ROUTED",
    "ReplicaConfig",
    "ReplicaStatistics",
    "Replicator",
]

logger = logging.getLogger(__name__)

PROTOCOL = "crdtswarm/sync/1"
ROUTED = 100
"""The message type of a routed update (not a y-protocols type)."""
ORIGIN_SIZE = 4
"""Bytes of the origin's key that a routed update carries."""
FLOODED = 101
"""The message type of a routed update that goes to every peer from here on."""
_ROUTED_TAG = encode_uvarint(ROUTED)
_FLOODED_TAG = encode_uvarint(FLOODED)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaConfig:
    """Limits and timing of document replication."""

    batch_interval: float = 0.005
    """Seconds within which updates following a send are gathered into one (5 ms)."""
    max_message_size: int = 16 * 1024 * 1024
    """Largest sync message accepted from a peer, in bytes (16 MiB)."""
    max_update_size: int = 8 * 1024 * 1024
    """Largest single update accepted from a peer, in bytes (8 MiB)."""
    max_queued_size: int = 8 * 1024 * 1024
    """Updates queued for one peer before falling back to a full-state resync (8 MiB)."""
    max_name_size: int = 256
    """Longest document name, in UTF-8 bytes (256)."""
    compact_after: int = 500
    """Stored updates per document after which the store is compacted (500)."""
    anti_entropy_interval: float = 30.0
    """Seconds between state-vector exchanges with one random peer (30 s); 0 disables."""
    max_seen_updates: int = 8192
    """Routed updates remembered to drop duplicates and stop loops (8192)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaStatistics:
    """Counters of a `Replicator` since it started."""

    documents: int
    """Documents open now."""
    peers: int
    """Peers we replicate with now."""
    messages_sent: int
    """Sync messages sent (all documents, all peers)."""
    messages_received: int
    """Sync messages received."""
    updates_sent: int
    """Incremental updates sent (after merging bursts)."""
    resyncs: int
    """Full-state resyncs after a peer's send queue overflowed."""
    duplicates: int
    """Routed updates received again and dropped."""
    floods: int
    """Routed updates sent to every peer because the link graph could not be used."""


ProtocolErrorHandler = Callable[["PublicKey", Exception], Awaitable[None]]


class _PeerSync:
    """What we replicate with one peer: a session per shared document, a send queue."""

    def __init__(self, key: PublicKey) -> None:
        self.key = key
        self.sessions: dict[str, SyncSession] = {}
        # (doc, origin, flooded) -> updates to send
        self.pending: dict[tuple[str, bytes, bool], list[bytes]] = {}
        self.pending_size = 0
        self.resync: set[str] = set()
        self.wakeup = anyio.Event()
        self.idle = anyio.Event()  # set when the writer has sent everything queued
        self.writers = 0  # run_peer tasks sending to this peer now
        self.users = 0
        self.log = ContextLogger(logger, key.short)

    def wake(self) -> None:
        self.wakeup.set()


class Replicator:
    """Replicates named documents with every peer that opens the same names."""

    def __init__(
        self,
        *,
        config: ReplicaConfig | None = None,
        on_protocol_error: ProtocolErrorHandler | None = None,
        store: DocStore | None = None,
        public_key: PublicKey | None = None,
        rng: random.Random | None = None,
        flooded: Collection[str] = (),
    ) -> None:
        self._config = config or ReplicaConfig()
        self._store = store
        self._on_protocol_error = on_protocol_error
        self._me = public_key
        # the origin we give our own changes (zeros when we have no key: "unknown")
        self._me_prefix = bytes(public_key)[:ORIGIN_SIZE] if public_key else bytes(ORIGIN_SIZE)
        self._rng = rng or random.Random()
        self._flooded = frozenset(flooded)
        self._docs: dict[str, pycrdt.Doc[Any]] = {}
        self._known_parents: dict[str, set[tuple[int, int]]] = {}
        self._subscriptions: dict[str, Any] = {}
        self._peers: dict[PublicKey, _PeerSync] = {}
        self._origin: _PeerSync | None = None  # the peer whose message is being applied
        self._routed = False  # whether that message is a routed update (rule 3)
        self._routed_changed = False  # whether applying it changed the document
        self._rows: Mapping[PublicKey, Mapping[PublicKey, float]] = {}
        self._graph_built = True
        self._graph: LinkGraph[PublicKey] | None = None
        self._by_prefix: dict[bytes, PublicKey | None] = {}  # None: ambiguous
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._compaction_due: set[str] = set()
        self._maintenance = anyio.Event()
        self._counts = dict.fromkeys(
            (
                "messages_sent",
                "messages_received",
                "updates_sent",
                "resyncs",
                "duplicates",
                "floods",
            ),
            0,
        )

    def statistics(self) -> ReplicaStatistics:
        """A snapshot of the counters."""
        return ReplicaStatistics(documents=len(self._docs), peers=len(self._peers), **self._counts)

    # -- documents ---------------------------------------------------------------------

    def doc(self, name: str) -> pycrdt.Doc[Any]:
        """The document ``name``, opened (and announced to every peer) on first use.

        Raises:
            ValueError: if the name is empty or longer than ``max_name_size`` bytes.
        """
        existing = self._docs.get(name)
        if existing is not None:
            return existing
        if not name or len(name.encode()) > self._config.max_name_size:
            raise ValueError(f"document names are 1 to {self._config.max_name_size} bytes")
        doc = self._docs[name] = pycrdt.Doc()
        if self._store is not None:
            self._store.load(name, doc)
        self._subscriptions[name] = doc.observe(lambda event: self._on_change(name, event))
        for peer in self._peers.values():
            self._start_session(peer, name)
        return doc

    async def run(self) -> None:
        """Background upkeep (store compaction, anti-entropy) until cancelled; run it in a task."""
        interval = self._config.anti_entropy_interval
        next_exchange = anyio.current_time() + interval if interval > 0 else math.inf
        while True:
            with anyio.move_on_after(next_exchange - anyio.current_time()):
                await self._maintenance.wait()
            self._maintenance = anyio.Event()
            store = self._store
            for name in sorted(self._compaction_due):
                if store is not None and name in self._docs:
                    store.compact(name, self._docs[name])
            self._compaction_due.clear()
            if anyio.current_time() >= next_exchange:
                next_exchange = anyio.current_time() + interval
                self._exchange_state()

    def set_link_rows(self, rows: Mapping[PublicKey, Mapping[PublicKey, float]]) -> None:
        """Route updates along the link graph of ``rows`` (empty: flood; rule 3).

        ``rows`` are the members' latency rows (author -> peer -> seconds); the graph
        is built from them when an update next needs it.
        """
        self._rows = rows
        self._graph_built = False

    def _link_graph(self) -> LinkGraph[PublicKey] | None:
        if not self._graph_built:
            self._graph_built = True
            graph = LinkGraph.from_rows(self._rows) if self._rows else None
            by_prefix: dict[bytes, PublicKey | None] = {}
            for key in graph.nodes() if graph is not None else ():
                prefix = bytes(key)[:ORIGIN_SIZE]
                by_prefix[prefix] = None if prefix in by_prefix else key
            self._graph, self._by_prefix = graph, by_prefix
        return self._graph

    def _exchange_state(self, peer: _PeerSync | None = None) -> None:
        """Send our state vectors to ``peer`` (default: one at random; rule 8)."""
        if peer is None:
            peers = [p for p in self._peers.values() if p.writers]
            if not peers:
                return
            peer = self._rng.choice(peers)
        for name in self._docs:
            session = peer.sessions.get(name)
            if session is not None and not session.is_failed:
                with contextlib.suppress(LocalProtocolError):  # its queue is full: next time
                    session.start()
        peer.wake()

    async def drain(self) -> None:
        """Wait until every peer's writer has sent what is queued (bound it with a timeout)."""
        for peer in list(self._peers.values()):
            while peer.writers and (peer.wakeup.is_set() or peer.pending):
                await peer.idle.wait()

    def close(self) -> None:
        """Stop persisting and replicating: later edits stay local (the store is not closed)."""
        for name, subscription in self._subscriptions.items():
            self._docs[name].unobserve(subscription)
        self._subscriptions.clear()
        self._store = None

    @property
    def names(self) -> list[str]:
        """The names of the open documents."""
        return list(self._docs)

    def _on_change(self, name: str, event: Any) -> None:
        update: bytes = event.update
        if self._store is not None and self._store.append(name, update):
            self._compaction_due.add(name)
            self._maintenance.set()
        if self._routed:
            self._routed_changed = True  # _handle_routed forwards it as it came
            return
        # a local edit, or a change applied from a step 2: we are its origin (rule 2)
        targets, flood = self._targets(name, self._me, self._origin)
        for peer in targets:
            self._enqueue(peer, (name, self._me_prefix, flood), update)

    def _enqueue(self, peer: _PeerSync, key: tuple[str, bytes, bool], update: bytes) -> None:
        name = key[0]
        if peer.pending_size + len(update) > self._config.max_queued_size:
            peer.log.warning("send queue full for %r: falling back to a full resync", name)
            peer.pending.clear()
            peer.pending_size = 0
            peer.resync.update(peer.sessions)
            self._counts["resyncs"] += 1
        else:
            peer.pending.setdefault(key, []).append(update)
            peer.pending_size += len(update)
        peer.wake()

    def _targets(
        self, name: str, origin: PublicKey | None, sender: _PeerSync | None
    ) -> tuple[list[_PeerSync], bool]:
        """Where an update of ``name`` from ``origin`` received from ``sender`` goes.

        Returns the peers, and whether the update is flooded from here on (rule 3).
        """
        peers = self._peers
        everyone = [p for p in peers.values() if p is not sender]
        if name in self._flooded:
            return everyone, False
        graph, me = self._link_graph(), self._me
        if graph is None or origin is None or me is None or me not in graph:
            return self._flood(everyone)
        tree = graph.tree(origin)
        if me not in tree:
            return self._flood(everyone)
        if (
            sender is not None
            and origin != me
            and graph.has_edge(me, sender.key)
            and tree.parent(me) != sender.key
        ):
            return self._flood(everyone)  # the sender's view of the tree is not ours
        targets: list[_PeerSync] = []
        for child in tree.children(me):
            peer = peers.get(child)
            if peer is None:
                return self._flood(everyone)  # its subtree would miss the update
            if peer is not sender:
                targets.append(peer)
        # links the graph does not show yet: the peer may be nobody else's child
        targets.extend(p for k, p in peers.items() if p is not sender and not graph.has_edge(me, k))
        return targets, False

    def _flood(self, everyone: list[_PeerSync]) -> tuple[list[_PeerSync], bool]:
        if self._graph is not None and everyone:
            self._counts["floods"] += 1
        return everyone, True

    def _start_session(self, peer: _PeerSync, name: str) -> SyncSession:
        session = SyncSession(
            self._docs[name],
            max_update_size=self._config.max_update_size,
            known_parents=self._known_parents.setdefault(name, set()),
        )
        session.start()
        peer.sessions[name] = session
        peer.wake()
        return session

    # -- peers ---------------------------------------------------------------------------

    def _join(self, key: PublicKey) -> _PeerSync:
        peer = self._peers.get(key)
        if peer is None:
            peer = self._peers[key] = _PeerSync(key)
            for name in self._docs:
                self._start_session(peer, name)
        peer.users += 1
        return peer

    def _leave(self, peer: _PeerSync) -> None:
        peer.users -= 1
        if self._peers.get(peer.key) is not peer:
            return
        if peer.users > 0:
            # a duplicate link ended: what its writer had taken may be lost with it
            self._exchange_state(peer)
        else:
            del self._peers[peer.key]
            # what was in flight on that link is lost, and with it maybe the only path
            # an update had to part of the tree: compare states with everyone left
            for other in self._peers.values():
                self._exchange_state(other)

    async def run_peer(
        self, key: PublicKey, open_stream: Callable[[], Awaitable[MuxStream]]
    ) -> None:
        """Send to peer ``key`` over a stream from ``open_stream`` until the link ends."""
        peer = self._join(key)
        try:
            stream = await open_stream()
            peer.writers += 1
            try:
                await self._write_loop(peer, stream)
            finally:
                peer.writers -= 1
                peer.idle.set()  # nobody sends to this peer any more: do not wait for it
                await stream.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, StreamResetError) as exc:
            peer.log.debug("sync stream ended: %r", exc)
        finally:
            self._leave(peer)

    async def serve_incoming(self, stream: MuxStream, key: PublicKey) -> None:
        """Read the peer's sync stream until it ends (the handler for `PROTOCOL`)."""
        peer = self._join(key)
        decoder = FrameDecoder(self._config.max_message_size)
        try:
            async for chunk in stream:
                for frame in decoder.feed(chunk):
                    self._handle(peer, frame)
        except LocalProtocolError as exc:  # a session's reply queue overflowed: a flood
            peer.log.warning("dropping link: sync flood: %s", exc)
            await stream.reset(ErrorCode.REFUSED, "sync flood")
            if self._on_protocol_error is not None:
                await self._on_protocol_error(key, exc)
        except (FrameError, SyncError, RemoteProtocolError) as exc:
            peer.log.warning("dropping link: bad sync message: %s", exc)
            code = exc.code if isinstance(exc, RemoteProtocolError) else ErrorCode.PROTOCOL_ERROR
            await stream.reset(code, str(exc)[:200])
            if self._on_protocol_error is not None:
                await self._on_protocol_error(key, exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, StreamResetError):
            pass
        finally:
            self._leave(peer)

    def _handle(self, peer: _PeerSync, frame: bytes) -> None:
        reader = Reader(frame)
        name = reader.read_var_string(self._config.max_name_size)
        payload = reader.read_rest()
        self._counts["messages_received"] += 1
        if payload[:1] in (_ROUTED_TAG, _FLOODED_TAG):
            self._handle_routed(peer, name, payload)
            return
        if name not in self._docs:
            return  # the peer shares a document we have not opened
        self._receive(peer, name, lambda session: session.receive_message(payload))
        peer.wake()

    def _receive(
        self,
        peer: _PeerSync,
        name: str,
        apply: Callable[[SyncSession], None],
        *,
        routed: bool = False,
    ) -> bool:
        """Apply a message of ``peer`` to document ``name``; whether the document changed.

        pycrdt gives no transaction origin: the doc observer (`_on_change`) learns
        from these fields which peer, and which kind of message, it is applying.
        """
        session = peer.sessions.get(name) or self._start_session(peer, name)
        self._origin, self._routed, self._routed_changed = peer, routed, False
        try:
            apply(session)
        finally:
            self._origin, self._routed = None, False
        while session.next_event() is not None:
            pass
        return self._routed_changed

    def _handle_routed(self, peer: _PeerSync, name: str, payload: bytes) -> None:
        reader = Reader(payload)
        flooding = reader.read_uvarint() == FLOODED
        origin = reader.read_bytes(ORIGIN_SIZE)
        update = reader.read_var_bytes(self._config.max_update_size)
        if reader.remaining:
            raise FrameError(f"{reader.remaining} bytes after a routed update")
        digest = hashlib.blake2b(update, digest_size=16, person=origin).digest()
        seen_key = encode_var_string(name) + digest
        if seen_key in self._seen:
            self._seen.move_to_end(seen_key)
            self._counts["duplicates"] += 1
            return
        self._seen[seen_key] = None
        if len(self._seen) > self._config.max_seen_updates:
            self._seen.popitem(last=False)
        if name in self._docs:
            changed = self._receive(
                peer, name, lambda session: session.receive_update(update), routed=True
            )
            if not changed:
                # nothing new: it was forwarded when it first arrived (by whatever way)
                self._counts["duplicates"] += 1
                return
        else:
            validate_update(update)  # in transit: at least well-formed
        if self._me is not None and origin == self._me_prefix:
            return  # our own update, back through a loop: our tree already has it
        if flooding:  # a node upstream could not use the tree: neither can we
            targets, flood = [p for p in self._peers.values() if p is not peer], True
        else:
            key = None
            if name not in self._flooded and self._link_graph() is not None:
                key = self._by_prefix.get(origin)
            targets, flood = self._targets(name, key, peer)
        for target in targets:
            self._enqueue(target, (name, origin, flood), update)

    async def _write_loop(self, peer: _PeerSync, stream: MuxStream) -> None:
        batch = self._config.batch_interval
        last_update = -math.inf
        while True:
            await peer.wakeup.wait()
            if peer.pending and batch > 0:
                # The first update after a quiet spell goes out at once; while updates
                # keep coming, they are gathered for up to batch_interval and merged.
                await anyio.sleep_until(last_update + batch)
                last_update = anyio.current_time()
            peer.wakeup = anyio.Event()
            frames = self._collect(peer)
            if frames:
                await stream.send(b"".join(frames))
            if not peer.wakeup.is_set():
                peer.idle.set()
                peer.idle = anyio.Event()

    def _collect(self, peer: _PeerSync) -> list[bytes]:
        for name in peer.resync:
            if (session := peer.sessions.get(name)) is not None:
                session.send_update(self._docs[name].get_update())
        peer.resync.clear()
        frames: list[bytes] = []
        for (name, origin, flood), updates in peer.pending.items():
            merged = updates[0] if len(updates) == 1 else pycrdt.merge_updates(*updates)
            body = (_FLOODED_TAG if flood else _ROUTED_TAG) + origin + encode_var_bytes(merged)
            frames.append(encode_frame(encode_var_string(name) + body))
            self._counts["updates_sent"] += 1
        peer.pending.clear()
        peer.pending_size = 0
        for name, session in peer.sessions.items():
            prefix = encode_var_string(name)
            frames.extend(encode_frame(prefix + message) for message in session.data_to_send())
        self._counts["messages_sent"] += len(frames)
        return frames
