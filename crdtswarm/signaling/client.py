"""The signaling client: one registered connection to every configured server.

`SignalingClient` speaks the wire protocol of `crdtswarm.signaling.server` (see its
docstring for the frames). For each URL it runs one supervisor task that connects,
answers the CHALLENGE with a REGISTER signed by our identity, and then serves the
connection until it drops; then it waits (exponential backoff with jitter) and
connects again, forever, until the client is closed. A server that is down at start
is just retried: entering the client never fails because of a server.

Rules:

1. Blobs are opaque. The client neither seals nor opens signals: callers pass
   `crdtswarm.protocol.signal.seal_signal` output to `SignalingClient.send` and give
   what `SignalingClient.receive` returns to ``open_signal`` (whose replay cache also
   drops the duplicates that arrive through several servers).
2. `SignalingClient.send` queues the FORWARD frame on every registered connection
   (redundancy); a connection whose bounded queue is full drops it and counts.
3. Received blobs go into one bounded buffer; when it is full, a blob is dropped,
   counted and logged, so a slow consumer never stalls the socket readers.
4. A connection that sends a malformed frame is closed (1002) and reconnected.
5. The backoff delay doubles from ``min_reconnect_delay`` to ``max_reconnect_delay``;
   each wait is drawn uniformly from half the delay to the delay. It starts over
   once a connection has stayed registered for ``max_reconnect_delay`` seconds, so
   a flapping server (or a key registered twice, which servers resolve by closing
   the older connection) does not cause a reconnect storm.

Signal contents are never logged.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import anyio
import websockets.asyncio.client
from anyio.lowlevel import checkpoint
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException
from websockets.uri import parse_uri

from crdtswarm.errors import ConnectError, FrameError
from crdtswarm.identity import KEY_SIZE, Identity, PublicKey
from crdtswarm.log import ContextLogger
from crdtswarm.signaling.server import (
    CHALLENGE_SIZE,
    CLOSE_REPLACED,
    FORWARD_HEADER_SIZE,
    FrameType,
    close_websocket,
    finish_websocket_tasks,
    register_message,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Sequence

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from websockets.asyncio.client import ClientConnection

__all__ = ["SignalingClient", "SignalingClientConfig", "SignalingClientStatistics"]

logger = logging.getLogger(__name__)

_CLOSE_PROTOCOL: Final = 1002
_KEEPALIVE: Final = bytes((FrameType.KEEPALIVE,))


@dataclass(frozen=True, kw_only=True, slots=True)
class SignalingClientConfig:
    """Timers and limits of a `SignalingClient`.

    Raises:
        ValueError: on construction, if a value is out of range.
    """

    min_reconnect_delay: float = 0.5
    """Seconds before the first reconnection attempt (default 0.5)."""
    max_reconnect_delay: float = 30.0
    """Largest delay between attempts, in seconds (default 30.0)."""
    connect_timeout: float = 10.0
    """Seconds for the TCP and WebSocket opening handshakes (default 10.0)."""
    registration_timeout: float = 10.0
    """Seconds to wait for the CHALLENGE, then for REGISTERED (default 10.0)."""
    keepalive_interval: float = 30.0
    """Seconds between KEEPALIVE frames on a registered connection (default 30.0; keep
    it well under the server's ``idle_timeout``, 120 s by default)."""
    send_timeout: float = 2.0
    """Seconds `SignalingClient.send` waits for a registered connection when there is
    none (default 2.0; 0 fails at once)."""
    max_signal_size: int = 64 * 1024
    """Largest blob sent or received, in bytes (default 64 KiB)."""
    max_received_signals: int = 256
    """Received blobs buffered until `SignalingClient.receive` takes them (default 256);
    more are dropped."""
    max_queued_signals: int = 64
    """Outgoing frames queued per connection (default 64); more are dropped."""
    ping_interval: float | None = 20.0
    """Seconds between WebSocket pings (default 20.0; None disables them)."""
    ping_timeout: float | None = 20.0
    """Seconds to wait for a pong before dropping the connection (default 20.0)."""
    close_timeout: float = 5.0
    """Seconds to wait for the closing handshake (default 5.0)."""
    proxy: str | Literal[True] | None = None
    """HTTP/SOCKS proxy: None (the default) connects directly, True uses the system's
    proxy settings, a string names a proxy URL."""

    def __post_init__(self) -> None:
        for name in (
            "min_reconnect_delay",
            "connect_timeout",
            "registration_timeout",
            "keepalive_interval",
            "close_timeout",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds > 0, not {value}")
        if not self.max_reconnect_delay >= self.min_reconnect_delay:
            raise ValueError("max_reconnect_delay must be >= min_reconnect_delay")
        if not (self.send_timeout >= 0 and math.isfinite(self.send_timeout)):
            raise ValueError(f"send_timeout must be >= 0 seconds, not {self.send_timeout}")
        for name in ("max_signal_size", "max_received_signals", "max_queued_signals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SignalingClientStatistics:
    """Counters of a `SignalingClient` (a gauge now, counts since start)."""

    connected: int
    """Servers we are registered on now."""
    registrations: int
    """Successful registrations, first connections and reconnections alike."""
    connect_failures: int
    """Attempts that ended before registering."""
    signals_sent: int
    """`SignalingClient.send` calls that queued the blob on at least one connection."""
    sends_dropped: int
    """Frames dropped because a connection's outgoing queue was full."""
    signals_received: int
    """Blobs put in the receive buffer."""
    signals_dropped: int
    """Blobs dropped because the receive buffer was full."""
    not_here: int
    """NOT_HERE answers: a recipient was not registered on that server."""


class _Link:
    """One registered connection and its outgoing queue."""

    def __init__(self, url: str, ws: ClientConnection, size: int) -> None:
        self.url = url
        self.ws = ws
        self.outbox_send: MemoryObjectSendStream[bytes]
        self.outbox_receive: MemoryObjectReceiveStream[bytes]
        self.outbox_send, self.outbox_receive = anyio.create_memory_object_stream[bytes](size)


class SignalingClient(anyio.AsyncContextManagerMixin):
    """Keeps a registered connection to every signaling server in ``urls``.

    Use it with ``async with``; needs anyio's asyncio backend (websockets). Entering
    starts connecting in the background (see `wait_connected`); exiting closes every
    connection (within ``close_timeout``); blobs received but not yet taken can still
    be read with `receive` after exit, then it raises ``anyio.EndOfStream``.

    Args:
        identity: who we register as; servers route blobs for its public key to us.
        urls: signaling server URLs (``"ws://host:port"`` or ``"wss://..."``).
        config: timers and limits; None uses the defaults.

    Raises:
        ValueError: if a URL is not a WebSocket URL.
    """

    def __init__(
        self,
        identity: Identity,
        urls: Sequence[str],
        *,
        config: SignalingClientConfig | None = None,
    ) -> None:
        if isinstance(urls, str):
            raise TypeError("urls must be a sequence of URLs, not one string")
        for url in urls:
            try:
                parse_uri(url)
            except InvalidURI as exc:
                raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}") from exc
        self._identity = identity
        self._urls = tuple(dict.fromkeys(urls))
        self._config = config or SignalingClientConfig()
        self._log = ContextLogger(logger, identity.public_key.short)
        self._links: dict[str, _Link] = {}
        self._changed = anyio.Event()
        self._running = False
        self._closed = False
        self._random = random.Random()
        # Made on entry (anyio warns about memory streams never closed); on exit what
        # was not received yet moves to _leftover, so receive() still returns it.
        self._inbox_send: MemoryObjectSendStream[bytes] | None = None
        self._inbox_receive: MemoryObjectReceiveStream[bytes] | None = None
        self._leftover: collections.deque[bytes] = collections.deque()
        self._registrations = 0
        self._connect_failures = 0
        self._sent = 0
        self._sends_dropped = 0
        self._received = 0
        self._dropped = 0
        self._not_here = 0
        self._dropping = False

    @property
    def urls(self) -> tuple[str, ...]:
        """The configured server URLs, without duplicates."""
        return self._urls

    @property
    def is_connected(self) -> bool:
        """Whether we are registered on at least one server now."""
        return bool(self._links)

    @property
    def connected_urls(self) -> list[str]:
        """The URLs of the servers we are registered on now, in configuration order."""
        return [url for url in self._urls if url in self._links]

    def statistics(self) -> SignalingClientStatistics:
        """The client's gauge and counters."""
        return SignalingClientStatistics(
            connected=len(self._links),
            registrations=self._registrations,
            connect_failures=self._connect_failures,
            signals_sent=self._sent,
            sends_dropped=self._sends_dropped,
            signals_received=self._received,
            signals_dropped=self._dropped,
            not_here=self._not_here,
        )

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[SignalingClient]:
        if self._running or self._closed:
            raise RuntimeError("a SignalingClient can be entered only once")
        self._running = True
        inbox_send, inbox_receive = anyio.create_memory_object_stream[bytes](
            self._config.max_received_signals
        )
        self._inbox_send, self._inbox_receive = inbox_send, inbox_receive
        try:
            async with anyio.create_task_group() as tg:
                for url in self._urls:
                    tg.start_soon(self._maintain, url, name=f"signaling {url}")
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._running = False
            self._closed = True
            inbox_send.close()  # receivers waiting now get EndOfStream
            while True:
                try:
                    self._leftover.append(inbox_receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            inbox_receive.close()
            self._notify()

    async def wait_connected(self, url: str | None = None) -> None:
        """Wait until we are registered on at least one server, or on ``url``.

        Raises:
            ValueError: if ``url`` is not one of `urls`.
            anyio.ClosedResourceError: if the client is closed.
        """
        if url is not None and url not in self._urls:
            raise ValueError(f"not a configured signaling server: {url!r}")
        await checkpoint()
        while not (self._links if url is None else url in self._links):
            if self._closed:
                raise anyio.ClosedResourceError
            await self._changed.wait()

    async def send(self, recipient: PublicKey, blob: bytes) -> None:
        """Forward ``blob`` to ``recipient`` through every server we are registered on.

        Waits up to ``send_timeout`` for a registration when there is none.

        Raises:
            ValueError: if ``blob`` is empty or larger than ``max_signal_size``.
            crdtswarm.errors.ConnectError: if no server is connected, or every
                connection's outgoing queue is full.
            anyio.ClosedResourceError: if the client is closed.
        """
        if not 0 < len(blob) <= self._config.max_signal_size:
            raise ValueError(
                f"a blob is 1 to {self._config.max_signal_size} bytes, not {len(blob)}"
            )
        frame = bytes((FrameType.FORWARD,)) + bytes(recipient) + blob
        await checkpoint()
        if self._closed:
            raise anyio.ClosedResourceError
        if not self._links:
            with anyio.move_on_after(self._config.send_timeout):
                await self.wait_connected()
        if not self._links:
            raise ConnectError(f"not connected to any signaling server ({len(self._urls)} set)")
        queued = 0
        for link in list(self._links.values()):
            try:
                link.outbox_send.send_nowait(frame)
                queued += 1
            except anyio.WouldBlock:
                self._sends_dropped += 1
                self._log.debug("outgoing queue to %s full: dropping a signal", link.url)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
        if not queued:
            raise ConnectError("every signaling connection's outgoing queue is full")
        self._sent += 1

    async def receive(self) -> bytes:
        """The next blob some server delivered to us.

        Raises:
            anyio.EndOfStream: once the client is closed and every buffered blob taken.
            RuntimeError: if the client was never entered.
        """
        if self._inbox_receive is None:
            raise RuntimeError("enter the SignalingClient (async with) before receiving")
        try:
            return await self._inbox_receive.receive()
        except anyio.ClosedResourceError:
            return self._take_leftover()

    def receive_nowait(self) -> bytes:
        """The next buffered blob, without waiting.

        Raises:
            anyio.WouldBlock: if no blob is buffered.
            anyio.EndOfStream: once the client is closed and every buffered blob taken.
            RuntimeError: if the client was never entered.
        """
        if self._inbox_receive is None:
            raise RuntimeError("enter the SignalingClient (async with) before receiving")
        try:
            return self._inbox_receive.receive_nowait()
        except anyio.ClosedResourceError:
            return self._take_leftover()

    def _take_leftover(self) -> bytes:
        if self._leftover:
            return self._leftover.popleft()
        raise anyio.EndOfStream

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await self.receive()
            except anyio.EndOfStream:
                return

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- per-server supervision ----------------------------------------------------

    async def _maintain(self, url: str) -> None:
        """Connect to ``url``, serve the connection, back off, repeat; until cancelled."""
        config = self._config
        delay = config.min_reconnect_delay
        while True:
            registered_for = await self._connect_once(url)
            if registered_for is None:
                self._connect_failures += 1
            elif registered_for >= config.max_reconnect_delay:
                delay = config.min_reconnect_delay
            wait = self._random.uniform(delay / 2, delay)
            self._log.debug("reconnecting to %s in %.2f s", url, wait)
            await anyio.sleep(wait)
            delay = min(delay * 2, config.max_reconnect_delay)

    async def _connect_once(self, url: str) -> float | None:
        """One connection's life: seconds it stayed registered, or None if it never did."""
        config = self._config
        try:
            ws = await websockets.asyncio.client.connect(
                url,
                open_timeout=config.connect_timeout,
                ping_interval=config.ping_interval,
                ping_timeout=config.ping_timeout,
                close_timeout=config.close_timeout,
                max_size=config.max_signal_size + FORWARD_HEADER_SIZE,
                max_queue=4,
                compression=None,
                proxy=config.proxy,
                user_agent_header=None,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._log.debug("cannot connect to %s: %s", url, exc)
            return None
        close_code, close_reason = 1000, ""
        registered_at: float | None = None
        keepalive = {ws.keepalive_task} if ws.keepalive_task is not None else set()
        try:
            await self._register(ws)
            registered_at = anyio.current_time()
            self._registrations += 1
            self._log.info("registered on %s", url)
            await self._serve(url, ws)
        except FrameError as exc:
            self._log.warning("%s broke the signaling protocol: %s", url, exc)
            close_code, close_reason = _CLOSE_PROTOCOL, str(exc)[:100]
        except TimeoutError:
            self._log.info("%s did not complete registration in time", url)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code == CLOSE_REPLACED:
                self._log.warning("%s: our key registered from elsewhere; reconnecting", url)
            else:
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                self._log.info("disconnected from %s (%s %s)", url, code, reason)
        except (OSError, WebSocketException) as exc:
            self._log.info("connection to %s failed: %s", url, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await close_websocket(ws, close_code, close_reason)
                await finish_websocket_tasks(keepalive, config.close_timeout)
        if registered_at is None:
            return None
        return anyio.current_time() - registered_at

    async def _register(self, ws: ClientConnection) -> None:
        """Answer the CHALLENGE and wait for REGISTERED.

        Raises:
            FrameError: if the server sent something else.
            TimeoutError: if it took longer than ``registration_timeout``.
            websockets.exceptions.ConnectionClosed: if the connection ended.
        """
        with anyio.fail_after(self._config.registration_timeout):
            challenge = _expect(await ws.recv(), FrameType.CHALLENGE, CHALLENGE_SIZE)
            signature = self._identity.sign(register_message(challenge))
            key = bytes(self._identity.public_key)
            await ws.send(bytes((FrameType.REGISTER,)) + key + signature)
            _expect(await ws.recv(), FrameType.REGISTERED, 0)

    async def _serve(self, url: str, ws: ClientConnection) -> None:
        """Run a registered connection until it ends; raises what ended it."""
        link = _Link(url, ws, self._config.max_queued_signals)
        self._links[url] = link
        self._notify()
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_loop, link)
                tg.start_soon(self._keepalive_loop, link)
                try:
                    await self._read_loop(link)
                except (FrameError, ConnectionClosed, OSError, WebSocketException) as exc:
                    error = exc
                tg.cancel_scope.cancel()
        finally:
            del self._links[url]
            link.outbox_send.close()
            link.outbox_receive.close()
            self._notify()
        if error is not None:
            raise error

    async def _read_loop(self, link: _Link) -> None:
        while True:
            message = await link.ws.recv()
            if isinstance(message, str):
                raise FrameError("text frame from the server")
            if not message:
                raise FrameError("empty frame from the server")
            kind = message[0]
            if kind == FrameType.DELIVER and len(message) > 1:
                assert self._inbox_send is not None  # set while running
                try:
                    self._inbox_send.send_nowait(message[1:])
                    self._received += 1
                    self._dropping = False
                except anyio.WouldBlock:
                    self._dropped += 1
                    # One warning per run of drops; the rest at debug level.
                    level = logging.DEBUG if self._dropping else logging.WARNING
                    self._dropping = True
                    self._log.log(level, "receive buffer full: dropped a signal from %s", link.url)
            elif kind == FrameType.NOT_HERE and len(message) == 1 + KEY_SIZE:
                self._not_here += 1
                self._log.debug("%s: recipient not registered there", link.url)
            else:
                raise FrameError(f"unexpected frame type {kind:#04x} ({len(message)} bytes)")

    async def _write_loop(self, link: _Link) -> None:
        try:
            async for frame in link.outbox_receive:
                await link.ws.send(frame)
        except ConnectionClosed:
            pass  # the read loop sees it too

    async def _keepalive_loop(self, link: _Link) -> None:
        while True:
            await anyio.sleep(self._config.keepalive_interval)
            # A full queue means signals are waiting: they keep the connection alive.
            with contextlib.suppress(anyio.WouldBlock):
                link.outbox_send.send_nowait(_KEEPALIVE)


def _expect(message: str | bytes, kind: FrameType, size: int) -> bytes:
    """The body of ``message`` if it is a ``kind`` frame with a ``size``-byte body.

    Raises:
        FrameError: otherwise.
    """
    if isinstance(message, str) or len(message) != 1 + size or message[0] != kind:
        raise FrameError(f"expected a {kind.name} frame")
    return bytes(message[1:])
