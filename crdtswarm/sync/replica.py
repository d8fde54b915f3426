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
2. Incremental updates. A change to a document (local, or applied from peer P) is
   queued for every peer we are in sync with on that document, except P: no echo.
   pycrdt gives no transaction origin, so the replicator records which peer it is
   applying for while `SyncSession.receive_message` runs (the doc observer fires
   synchronously inside it).
3. Partial mesh. Because of rule 2, an update reaches every node that has the
   document open and is connected through nodes that have it open too; applying
   an update twice changes nothing and fires no observer, so forwarding stops.
4. Bursts. An update after a quiet spell is sent at once; updates that follow
   within ``batch_interval`` of the last send are gathered and merged into one.
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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
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
from crdtswarm.protocol.wire import Reader, encode_var_string
from crdtswarm.sync.protocol import SyncSession
from crdtswarm.transport.framing import FrameDecoder, encode_frame

if TYPE_CHECKING:
    from crdtswarm.identity import PublicKey
    from crdtswarm.mux import MuxStream
    from crdtswarm.sync.store import DocStore

__all__ = ["PROTOCOL", "ReplicaConfig", "ReplicaStatistics", "Replicator"]

logger = logging.getLogger(__name__)

PROTOCOL = "crdtswarm/sync/1"


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


ProtocolErrorHandler = Callable[["PublicKey", Exception], Awaitable[None]]


class _PeerSync:
    """What we replicate with one peer: a session per shared document, a send queue."""

    def __init__(self, key: PublicKey) -> None:
        self.key = key
        self.sessions: dict[str, SyncSession] = {}
        self.pending: dict[str, list[bytes]] = {}
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
    ) -> None:
        self._config = config or ReplicaConfig()
        self._store = store
        self._on_protocol_error = on_protocol_error
        self._docs: dict[str, pycrdt.Doc[Any]] = {}
        self._subscriptions: dict[str, Any] = {}
        self._peers: dict[PublicKey, _PeerSync] = {}
        self._origin: _PeerSync | None = None
        self._compaction_due: set[str] = set()
        self._maintenance = anyio.Event()
        self._counts = dict.fromkeys(
            ("messages_sent", "messages_received", "updates_sent", "resyncs"), 0
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
        """Background upkeep (store compaction) until cancelled; run it in a task."""
        while True:
            await self._maintenance.wait()
            self._maintenance = anyio.Event()
            store = self._store
            for name in sorted(self._compaction_due):
                if store is not None and name in self._docs:
                    store.compact(name, self._docs[name])
            self._compaction_due.clear()

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
        for peer in self._peers.values():
            if peer is self._origin or name not in peer.sessions:
                continue
            if peer.pending_size + len(update) > self._config.max_queued_size:
                peer.log.warning("send queue full for %r: falling back to a full resync", name)
                peer.pending.clear()
                peer.pending_size = 0
                peer.resync.update(peer.sessions)
                self._counts["resyncs"] += 1
            else:
                peer.pending.setdefault(name, []).append(update)
                peer.pending_size += len(update)
            peer.wake()

    def _start_session(self, peer: _PeerSync, name: str) -> SyncSession:
        session = SyncSession(self._docs[name], max_update_size=self._config.max_update_size)
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
        if peer.users == 0 and self._peers.get(peer.key) is peer:
            del self._peers[peer.key]

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
        if name not in self._docs:
            return  # the peer shares a document we have not opened
        session = peer.sessions.get(name) or self._start_session(peer, name)
        self._origin = peer
        try:
            session.receive_message(payload)
        finally:
            self._origin = None
        while session.next_event() is not None:
            pass
        peer.wake()

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
        for name, updates in peer.pending.items():
            merged = updates[0] if len(updates) == 1 else pycrdt.merge_updates(*updates)
            peer.sessions[name].send_update(merged)
            self._counts["updates_sent"] += 1
        peer.pending.clear()
        peer.pending_size = 0
        frames: list[bytes] = []
        for name, session in peer.sessions.items():
            prefix = encode_var_string(name)
            frames.extend(encode_frame(prefix + message) for message in session.data_to_send())
        self._counts["messages_sent"] += len(frames)
        return frames
