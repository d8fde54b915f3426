"""A WebSocket signaling server: rendezvous by public key for sealed signals.

Nodes that cannot reach each other yet (no link, no relay) exchange WebRTC offers
and answers through any signaling server they both use. The server is an untrusted
carrier: it forwards opaque blobs (signals sealed with
`crdtswarm.protocol.signal.seal_signal`, which it can neither read, forge, nor
usefully alter, replay or redirect) and stores nothing beyond bounded
per-connection queues.

Wire protocol, one binary WebSocket message per frame, the first byte its type:

==========  =====  =========  ============================================================
frame       type   direction  body after the type byte
==========  =====  =========  ============================================================
CHALLENGE   0x01   S -> C     32 random bytes, sent as soon as the connection opens
REGISTER    0x02   C -> S     32-byte Ed25519 key, 64-byte signature of
                              ``REGISTER_DOMAIN + challenge`` by that key
REGISTERED  0x03   S -> C     nothing: the key is now routed to this connection
FORWARD     0x04   C -> S     32-byte recipient key, then the blob (1 byte or more)
DELIVER     0x05   S -> C     the blob, as forwarded (the server adds no sender)
NOT_HERE    0x06   S -> C     32-byte key: no connection is registered under it
KEEPALIVE   0x07   C -> S     nothing: keeps a registered, otherwise silent client alive
==========  =====  =========  ============================================================

Rules:

1. A client sends exactly one REGISTER, first, within ``registration_timeout``
   (else 1008); then only FORWARD and KEEPALIVE. Anything else closes that client, and only it:
   1002 for a malformed frame, 1003 for a text frame, 1008 for a bad signature or
   a frame out of place, 1009 (from websockets) for a message over the size limit.
2. The newest registration of a key wins: a second connection registering the same
   key replaces the first, which is closed with code 4000 (`CLOSE_REPLACED`). The
   challenge is fresh per connection, so a registration cannot be replayed.
3. FORWARD to a key nobody registered is answered with NOT_HERE (so the client can
   try another path); the signal is not stored.
4. Each connection's outgoing frames go through a bounded queue (signals and
   bytes); a frame that does not fit is dropped and counted. A slow recipient never
   blocks the sender's reader.
5. FORWARD and KEEPALIVE frames spend a token from a per-connection bucket
   (``signal_rate`` per second, ``signal_burst`` at most). Without a token the frame
   is dropped; after ``max_rate_violations`` such drops since the bucket was last
   full, the client is closed with 1008.
6. Beyond ``max_connections`` open connections, new ones are closed with 1013
   (after the WebSocket handshake; connections still in it are bounded in time by
   ``open_timeout`` only). A registered connection that sends nothing for
   ``idle_timeout`` is closed with 1001; websockets' ping/pong keepalive detects
   dead peers sooner.

Known limit: the challenge is not bound to the server's name, so a malicious server
could pass another server's challenge to a client and use the signature to register
that client's key there, displacing the client's own connection (rule 2). It would
still see only sealed blobs, which it could drop; clients limit the damage by using
several servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
import websockets.asyncio.connection
import websockets.asyncio.server
from websockets.exceptions import ConnectionClosed

from crdtswarm.errors import FrameError
from crdtswarm.identity import KEY_SIZE, SIGNATURE_SIZE, InvalidKeyError, PublicKey
from crdtswarm.log import ContextLogger

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from websockets.asyncio.server import ServerConnection

__all__ = [
    "CHALLENGE_SIZE",
    "CLOSE_REPLACED",
    "FORWARD_HEADER_SIZE",
    "REGISTER_DOMAIN",
    "FrameType",
    "SignalingServer",
    "SignalingServerConfig",
    "SignalingServerStatistics",
    "close_websocket",
    "finish_websocket_tasks",
    "register_message",
]

logger = logging.getLogger(__name__)

REGISTER_DOMAIN: Final = b"crdtswarm-signaling-v1\0"
"""Domain-separation prefix of the registration signature."""
CHALLENGE_SIZE: Final = 32
"""Bytes of the server's random challenge."""
CLOSE_REPLACED: Final = 4000
"""Close code sent to a connection whose key was registered again elsewhere."""
FORWARD_HEADER_SIZE: Final = 1 + KEY_SIZE
"""Bytes of a FORWARD frame before the blob."""

_CLOSE_GOING_AWAY: Final = 1001
_CLOSE_PROTOCOL: Final = 1002
_CLOSE_UNSUPPORTED: Final = 1003
_CLOSE_POLICY: Final = 1008
_CLOSE_TOO_BIG: Final = 1009
_CLOSE_TRY_LATER: Final = 1013


class FrameType(enum.IntEnum):
    """The first byte of every signaling frame."""

    CHALLENGE = 0x01
    """Server to client: 32 random bytes to sign."""
    REGISTER = 0x02
    """Client to server: key and signature of the challenge."""
    REGISTERED = 0x03
    """Server to client: the registration was accepted."""
    FORWARD = 0x04
    """Client to server: recipient key and blob."""
    DELIVER = 0x05
    """Server to client: a blob forwarded to us."""
    NOT_HERE = 0x06
    """Server to client: the recipient key is not registered here."""
    KEEPALIVE = 0x07
    """Client to server: no-op that resets the idle timer."""


def register_message(challenge: bytes) -> bytes:
    """The bytes a client signs to register: `REGISTER_DOMAIN` then the challenge."""
    return REGISTER_DOMAIN + challenge


@dataclass(frozen=True, kw_only=True, slots=True)
class SignalingServerConfig:
    """Limits and timers of a `SignalingServer`.

    Raises:
        ValueError: on construction, if a value is out of range.
    """

    max_signal_size: int = 64 * 1024
    """Largest blob in a FORWARD frame, in bytes (default 64 KiB); a WebSocket message
    over this plus the 33-byte header closes the client with 1009."""
    max_connections: int = 1024
    """Open connections at once, registered or not (default 1024); more are closed
    with 1013."""
    signal_rate: float = 50.0
    """Frames per second each connection may send after registering (default 50)."""
    signal_burst: int = 100
    """Frames a connection may send at once above ``signal_rate`` (default 100)."""
    max_rate_violations: int = 100
    """Frames dropped for rate, since the bucket was last full, before the client is
    closed with 1008 (default 100)."""
    max_queued_signals: int = 64
    """Frames queued towards one connection (default 64); more are dropped."""
    max_queued_bytes: int = 256 * 1024
    """Bytes queued towards one connection (default 256 KiB); more are dropped."""
    registration_timeout: float = 10.0
    """Seconds a new connection has to register (default 10.0)."""
    idle_timeout: float = 120.0
    """Seconds a registered connection may send nothing before it is closed (default
    120.0; ``math.inf`` disables it). Clients send KEEPALIVE frames to stay."""
    open_timeout: float = 10.0
    """Seconds for the WebSocket opening handshake (default 10.0)."""
    ping_interval: float | None = 20.0
    """Seconds between WebSocket pings (default 20.0; None disables them)."""
    ping_timeout: float | None = 20.0
    """Seconds to wait for a pong before closing (default 20.0; None waits forever)."""
    close_timeout: float = 5.0
    """Seconds to wait for the closing handshake before dropping the TCP connection
    (default 5.0)."""

    def __post_init__(self) -> None:
        for name in ("max_signal_size", "max_connections", "signal_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("max_rate_violations", "max_queued_signals"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.max_queued_bytes < self.max_signal_size + 1:
            raise ValueError("max_queued_bytes must hold at least one signal")
        for name in ("signal_rate", "registration_timeout", "idle_timeout"):
            _check_positive(name, getattr(self, name), allow_inf=name == "idle_timeout")
        for name in ("open_timeout", "close_timeout"):
            _check_positive(name, getattr(self, name))
        for name in ("ping_interval", "ping_timeout"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))


def _check_positive(name: str, value: float, *, allow_inf: bool = False) -> None:
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be > 0, not {value}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SignalingServerStatistics:
    """Counters of a `SignalingServer` (gauges now, counts since start)."""

    connections: int
    """WebSocket connections open now."""
    registered: int
    """Keys registered now."""
    connections_refused: int
    """Connections closed at once because ``max_connections`` were open."""
    signals_forwarded: int
    """FORWARD frames queued to their recipient."""
    signals_dropped: int
    """FORWARD frames dropped: over the rate limit or the recipient's queue full."""
    signals_not_here: int
    """FORWARD frames to a key not registered here (answered with NOT_HERE)."""
    clients_closed_for_abuse: int
    """Connections closed for a bad registration, a malformed, text or oversized
    frame, or sustained rate violations."""
    clients_timed_out: int
    """Connections closed for not registering in time, or idling."""


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str
    abuse: bool


class _Connection:
    """One client connection: its outgoing queue, rate bucket and registration."""

    def __init__(self, ws: ServerConnection, config: SignalingServerConfig, now: float) -> None:
        self.ws = ws
        self.config = config
        self.key: bytes | None = None
        self.outbox_send: MemoryObjectSendStream[bytes]
        self.outbox_receive: MemoryObjectReceiveStream[bytes]
        self.outbox_send, self.outbox_receive = anyio.create_memory_object_stream[bytes](
            config.max_queued_signals
        )
        self.queued_bytes = 0
        self.tokens = float(config.signal_burst)
        self.refilled_at = now
        self.violations = 0
        self.scope = anyio.CancelScope()
        self.kicked: _Close | None = None
        self.log = ContextLogger(logger, _peer_name(ws))

    def enqueue(self, frame: bytes) -> bool:
        """Queue ``frame`` for the writer; False (dropped) when the queue is full."""
        if self.queued_bytes + len(frame) > self.config.max_queued_bytes:
            return False
        try:
            self.outbox_send.send_nowait(frame)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        self.queued_bytes += len(frame)
        return True

    def take_token(self, now: float) -> bool:
        """Spend one rate token; False when the bucket is empty."""
        burst = self.config.signal_burst
        self.tokens = min(burst, self.tokens + (now - self.refilled_at) * self.config.signal_rate)
        self.refilled_at = now
        if self.tokens >= burst:
            self.violations = 0
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.violations += 1
        return False

    def kick(self, close: _Close) -> None:
        """Stop serving this connection; its handler closes it with ``close``."""
        self.kicked = close
        self.scope.cancel()

    async def write_loop(self) -> None:
        try:
            async for frame in self.outbox_receive:
                self.queued_bytes -= len(frame)
                await self.ws.send(frame)
        except ConnectionClosed:
            self.scope.cancel()


def _peer_name(ws: ServerConnection) -> str:
    try:
        address = ws.remote_address
    except Exception:  # pragma: no cover - the transport is gone
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _format_url(host: str, port: int) -> str:
    if ":" in host:
        return f"ws://[{host}]:{port}"
    return f"ws://{host}:{port}"


class SignalingServer(anyio.AsyncContextManagerMixin):
    """A signaling server; serves while inside ``async with``.

    Runs websockets' asyncio server, so it needs anyio's asyncio backend. On exit
    every connection is closed (1001) and every handler task has finished.

    Args:
        host: the interface to listen on (default ``"127.0.0.1"``). Prefer a literal
            address: a name resolving to several addresses with ``port=0`` binds a
            different port for each, and `url` names the first.
        port: the port; 0 (the default) picks a free one.
        config: limits and timers; None uses the defaults.

    Raises:
        ValueError: if ``port`` is out of range.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        config: SignalingServerConfig | None = None,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"port must be 0 to 65535, not {port}")
        self._host = host
        self._port = port
        self._config = config or SignalingServerConfig()
        self._url: str | None = None
        self._connections: set[_Connection] = set()
        self._registered: dict[bytes, _Connection] = {}
        self._refused = 0
        self._forwarded = 0
        self._dropped = 0
        self._not_here = 0
        self._abuse = 0
        self._timed_out = 0
        # websockets' keepalive tasks of closed connections, until they have finished.
        self._keepalive_tasks: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> SignalingServerConfig:
        """The server's limits and timers."""
        return self._config

    @property
    def url(self) -> str:
        """``"ws://host:port"`` with the bound port.

        Raises:
            RuntimeError: if the server is not running.
        """
        if self._url is None:
            raise RuntimeError("the signaling server is not running")
        return self._url

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: if the server is not running.
        """
        return int(self.url.rsplit(":", 1)[1])

    def statistics(self) -> SignalingServerStatistics:
        """The server's gauges and counters."""
        return SignalingServerStatistics(
            connections=len(self._connections),
            registered=len(self._registered),
            connections_refused=self._refused,
            signals_forwarded=self._forwarded,
            signals_dropped=self._dropped,
            signals_not_here=self._not_here,
            clients_closed_for_abuse=self._abuse,
            clients_timed_out=self._timed_out,
        )

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[SignalingServer]:
        config = self._config
        server = await websockets.asyncio.server.serve(
            self._handle,
            self._host,
            self._port,
            compression=None,
            server_header=None,
            open_timeout=config.open_timeout,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=config.close_timeout,
            max_size=config.max_signal_size + FORWARD_HEADER_SIZE,
            max_queue=4,
        )
        try:
            port = int(server.sockets[0].getsockname()[1])
            self._url = _format_url(self._host, port)
            logger.info("signaling server listening on %s", self._url)
            yield self
        finally:
            self._url = None
            with anyio.CancelScope(shield=True):
                server.close()
                await server.wait_closed()
                if server.close_task is not None:
                    await server.close_task
                await finish_websocket_tasks(self._keepalive_tasks, config.close_timeout)
            logger.info("signaling server stopped")

    async def _handle(self, ws: ServerConnection) -> None:
        """Serve one connection; websockets runs this in its own task per connection."""
        config = self._config
        if ws.keepalive_task is not None:
            self._keepalive_tasks = {t for t in self._keepalive_tasks if not t.done()}
            self._keepalive_tasks.add(ws.keepalive_task)
        if len(self._connections) >= config.max_connections:
            self._refused += 1
            logger.warning("refusing a connection: %d connections open", len(self._connections))
            await ws.close(_CLOSE_TRY_LATER, "too many connections")
            return
        conn = _Connection(ws, config, anyio.current_time())
        self._connections.add(conn)
        close: _Close | None = None
        try:
            with conn.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(conn.write_loop)
                    close = await self._serve(conn)
                    tg.cancel_scope.cancel()
        finally:
            self._connections.discard(conn)
            if conn.key is not None and self._registered.get(conn.key) is conn:
                del self._registered[conn.key]
            conn.outbox_send.close()
            conn.outbox_receive.close()
        close = conn.kicked or close
        if close is not None:
            if close.abuse:
                self._abuse += 1
            conn.log.info("closing (%d): %s", close.code, close.reason)
            await close_websocket(ws, close.code, close.reason)

    async def _serve(self, conn: _Connection) -> _Close | None:
        """Read frames until the client leaves (None) or must be closed (a `_Close`)."""
        try:
            close = await self._register(conn)
            if close is not None:
                return close
            return await self._read_loop(conn)
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == _CLOSE_TOO_BIG:
                self._abuse += 1
                conn.log.info("closed: message over the size limit")
            return None

    async def _register(self, conn: _Connection) -> _Close | None:
        challenge = os.urandom(CHALLENGE_SIZE)
        conn.enqueue(bytes((FrameType.CHALLENGE,)) + challenge)
        message: str | bytes | None = None
        with anyio.move_on_after(self._config.registration_timeout):
            message = await conn.ws.recv()
        if message is None:
            self._timed_out += 1
            return _Close(_CLOSE_POLICY, "registration timeout", abuse=False)
        if isinstance(message, str):
            return _Close(_CLOSE_UNSUPPORTED, "binary frames only", abuse=True)
        if len(message) != 1 + KEY_SIZE + SIGNATURE_SIZE or message[0] != FrameType.REGISTER:
            return _Close(_CLOSE_POLICY, "expected a REGISTER frame", abuse=True)
        raw_key = message[1 : 1 + KEY_SIZE]
        signature = message[1 + KEY_SIZE :]
        try:
            key = PublicKey(raw_key)
        except InvalidKeyError:
            return _Close(_CLOSE_POLICY, "invalid public key", abuse=True)
        if not key.verify(signature, register_message(challenge)):
            return _Close(_CLOSE_POLICY, "bad registration signature", abuse=True)
        previous = self._registered.get(raw_key)
        if previous is not None:
            previous.kick(_Close(CLOSE_REPLACED, "replaced by a newer registration", abuse=False))
        conn.key = raw_key
        self._registered[raw_key] = conn
        conn.log = ContextLogger(logger, key.short)
        conn.log.debug("registered")
        conn.enqueue(bytes((FrameType.REGISTERED,)))
        return None

    async def _read_loop(self, conn: _Connection) -> _Close | None:
        config = self._config
        while True:
            message: str | bytes | None = None
            with anyio.move_on_after(config.idle_timeout):
                message = await conn.ws.recv()
            if message is None:
                self._timed_out += 1
                return _Close(_CLOSE_GOING_AWAY, "idle timeout", abuse=False)
            if isinstance(message, str):
                return _Close(_CLOSE_UNSUPPORTED, "binary frames only", abuse=True)
            try:
                kind = _frame_type(message)
            except FrameError as exc:
                return _Close(_CLOSE_PROTOCOL, str(exc), abuse=True)
            if kind not in (FrameType.FORWARD, FrameType.KEEPALIVE):
                return _Close(_CLOSE_POLICY, f"unexpected {kind.name} frame", abuse=True)
            if kind is FrameType.KEEPALIVE and len(message) != 1:
                return _Close(_CLOSE_PROTOCOL, "malformed KEEPALIVE frame", abuse=True)
            if kind is FrameType.FORWARD and len(message) <= FORWARD_HEADER_SIZE:
                return _Close(_CLOSE_PROTOCOL, "FORWARD frame without a blob", abuse=True)
            if not conn.take_token(anyio.current_time()):
                if kind is FrameType.FORWARD:
                    self._dropped += 1
                if conn.violations > config.max_rate_violations:
                    return _Close(_CLOSE_POLICY, "rate limit exceeded", abuse=True)
                continue
            if kind is FrameType.FORWARD:
                self._forward(conn, message)

    def _forward(self, conn: _Connection, message: bytes) -> None:
        recipient = message[1:FORWARD_HEADER_SIZE]
        target = self._registered.get(recipient)
        if target is None:
            self._not_here += 1
            conn.enqueue(bytes((FrameType.NOT_HERE,)) + recipient)
            return
        if target.enqueue(bytes((FrameType.DELIVER,)) + message[FORWARD_HEADER_SIZE:]):
            self._forwarded += 1
        else:
            self._dropped += 1
            target.log.debug("outgoing queue full: dropping a signal")


async def close_websocket(
    ws: websockets.asyncio.connection.Connection, code: int, reason: str
) -> None:
    """Close ``ws`` with ``code``, discarding what the peer still sends meanwhile.

    websockets stops reading the socket while ``max_queue`` messages wait unread, so
    a connection we stopped reading would never see the peer's closing frame and
    would wait ``close_timeout``; draining lets the handshake finish. Shielded: it
    completes, within websockets' ``close_timeout``, even when cancelled.
    """

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()

    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await ws.close(code, reason)
            tg.cancel_scope.cancel()


async def finish_websocket_tasks(tasks: set[asyncio.Task[None]], timeout: float) -> None:
    """Wait (up to ``timeout`` seconds) for websockets' own ``tasks`` to finish.

    Closing a connection only cancels its keepalive task; waiting here means nothing
    of ours is still running once the server or client has exited.
    """
    pending = {task for task in tasks if not task.done()}
    tasks.clear()
    if pending:
        with anyio.move_on_after(timeout):
            await asyncio.wait(pending)


def _frame_type(message: bytes) -> FrameType:
    """The type of a binary frame.

    Raises:
        FrameError: if the frame is empty or its type byte unknown.
    """
    if not message:
        raise FrameError("empty frame")
    try:
        return FrameType(message[0])
    except ValueError:
        raise FrameError(f"unknown frame type {message[0]:#04x}") from None
