"""The multiplexer driver: many typed byte streams over one secure channel.

`MuxConnection` moves frames between `crdtswarm.protocol.mux.MuxSession` and a
message channel (normally a `crdtswarm.secure.SecureChannel`). It owns one task
group with three tasks: a reader (channel -> session -> streams), a single writer
(session -> channel) that everything else only wakes, and a timer that runs the
session's keepalive clock (pings, dead-peer detection).

`MuxStream` is an ``anyio.abc.ByteStream``: ``send`` waits for the peer's credit,
so a slow reader never makes the sender buffer more than one window;
``receive`` returns the next chunk that arrived (chunk boundaries are not a
promise), ``send_eof`` half-closes, ``reset`` aborts with an error code, and
``aclose`` half-closes and stops reading.

Errors on a stream: `crdtswarm.errors.StreamResetError` after a reset (either
side), ``anyio.BrokenResourceError`` when the connection died (``__cause__`` says
why), ``anyio.ClosedResourceError`` after our own ``aclose``, ``anyio.EndOfStream``
after the peer's EOF once everything was read.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream, ObjectStream, TaskGroup

from crdtswarm.errors import CrdtSwarmError, ErrorCode, RemoteProtocolError, StreamResetError
from crdtswarm.log import ContextLogger
from crdtswarm.protocol.mux import (
    ConnectionTerminated,
    DataReceived,
    MuxConfig,
    MuxSession,
    MuxStatistics,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["MuxConnection", "MuxStream", "StreamHandler"]

logger = logging.getLogger(__name__)

StreamHandler = Callable[["MuxStream"], Awaitable[None]]
"""Serves one incoming stream; the stream is closed when the handler returns."""


class MuxStream(ByteStream):
    """One substream of a `MuxConnection`, opened for a named protocol."""

    def __init__(self, connection: MuxConnection, stream_id: int, protocol: str) -> None:
        self._conn = connection
        self._id = stream_id
        self._protocol = protocol
        self._chunks: collections.deque[bytes] = collections.deque()
        self._remote_ended = False
        self._local_ended = False
        self._closed = False
        self._error: BaseException | None = None
        self._readable = anyio.Event()
        self._writable = anyio.Event()

    @property
    def stream_id(self) -> int:
        """The stream's id on the connection."""
        return self._id

    @property
    def protocol(self) -> str:
        """The protocol name the stream was opened for."""
        return self._protocol

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The connection's channel attributes (transport, addresses)."""
        return self._conn.extra_attributes

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Receive the next chunk of at most ``max_bytes`` bytes.

        Raises:
            anyio.EndOfStream: the peer half-closed and everything was read.
            StreamResetError: either side reset the stream.
            anyio.BrokenResourceError: the connection died.
            anyio.ClosedResourceError: we closed the stream.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        while not self._chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                raise anyio.EndOfStream
            self._readable = anyio.Event()
            await self._readable.wait()
        chunk = self._chunks[0]
        if len(chunk) > max_bytes:
            self._chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        else:
            self._chunks.popleft()
        self._conn._consume(self._id, len(chunk))
        await anyio.lowlevel.cancel_shielded_checkpoint()
        return chunk

    async def send(self, item: bytes) -> None:
        """Send ``item``, waiting for the peer's flow-control credit as needed.

        Raises:
            StreamResetError: either side reset the stream.
            anyio.BrokenResourceError: the connection died.
            anyio.ClosedResourceError: we closed or half-closed the stream.
        """
        await anyio.lowlevel.checkpoint()
        data = bytes(item)
        while True:
            self._check_writable()
            try:
                sent = self._conn._session.send_data(self._id, data)
            except StreamResetError as exc:
                self._fail(exc)
                raise
            if sent:
                self._conn._wake()
                if sent == len(data):
                    return
                data = data[sent:]
            if self._conn._session.send_window(self._id) == 0:
                self._writable = anyio.Event()
                await self._writable.wait()
            else:  # credit but the session's output queue is full: wait for the writer
                await self._conn._wait_drained()

    async def send_eof(self) -> None:
        """Half-close: the peer reads ``EndOfStream`` after the data sent so far."""
        await anyio.lowlevel.checkpoint()
        if self._local_ended or self._error is not None or self._conn._session.is_closed:
            return
        self._local_ended = True
        self._conn._session.send_eof(self._id)
        self._conn._wake()
        self._conn._release_if_done(self)

    async def reset(self, code: ErrorCode | int = ErrorCode.CANCELLED, message: str = "") -> None:
        """Abort the stream in both directions, telling the peer ``code`` and ``message``."""
        await anyio.lowlevel.checkpoint()
        self.reset_nowait(code, message)

    def reset_nowait(self, code: ErrorCode | int = ErrorCode.CANCELLED, message: str = "") -> None:
        """`reset` without a checkpoint."""
        if self._error is None and not self._conn._session.is_closed:
            self._conn._session.reset_stream(self._id, code, message)
            self._conn._wake()
        self._fail(StreamResetError(code, message, remote=False))

    async def aclose(self) -> None:
        """Half-close our side and stop reading; data arriving later makes us reset."""
        if self._closed:
            return
        if self._error is None and not self._local_ended:
            self._local_ended = True
            if not self._conn._session.is_closed:
                self._conn._session.send_eof(self._id)
                self._conn._wake()
        self._closed = True
        unread = sum(len(c) for c in self._chunks)
        self._chunks.clear()
        if unread:
            self._conn._consume(self._id, unread)
        self._readable.set()
        self._writable.set()
        self._conn._release_if_done(self)
        await anyio.lowlevel.checkpoint()

    # -- driven by the connection -------------------------------------------------

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self._local_ended:
            raise anyio.ClosedResourceError
        if self._conn._session.is_closed:  # GOAWAY sent or received: streams end next
            raise anyio.BrokenResourceError("the connection is closing")

    def _feed(self, data: bytes) -> None:
        if self._closed:
            self._conn._consume(self._id, len(data))
            self.reset_nowait(ErrorCode.CANCELLED, "stream closed by the reader")
            return
        self._chunks.append(data)
        self._readable.set()

    def _feed_eof(self) -> None:
        self._remote_ended = True
        self._readable.set()
        self._conn._release_if_done(self)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        self._conn._forget(self._id)

    @property
    def _is_done(self) -> bool:
        return self._error is not None or (
            self._local_ended and (self._remote_ended or self._closed)
        )


class MuxConnection(anyio.AsyncContextManagerMixin):
    """Runs a `MuxSession` over a message channel; use it with ``async with``.

    Args:
        channel: a connected message channel; the connection owns and closes it.
        is_initiator: whether this side dialled (decides stream id parity).
        accept: maps an incoming stream's protocol to its handler, or None to reset
            the stream with ``UNKNOWN_PROTOCOL``.
        config: mux limits and timers.
        name: a short label for logs (usually the peer's short key).
    """

    def __init__(
        self,
        channel: ObjectStream[bytes],
        *,
        is_initiator: bool,
        accept: Callable[[str], StreamHandler | None],
        config: MuxConfig | None = None,
        name: str = "",
    ) -> None:
        self._channel = channel
        self._config = config or MuxConfig()
        self._session = MuxSession(
            is_initiator=is_initiator, config=self._config, now=anyio.current_time()
        )
        self._accept = accept
        self._streams: dict[int, MuxStream] = {}
        self._wakeup = anyio.Event()
        self._drained: anyio.Event | None = None  # made by a sender that waits for it
        self._closed = anyio.Event()
        self._error: BaseException | None = None
        self._task_group: TaskGroup | None = None
        self._last_rtt: float | None = None
        self._log = ContextLogger(logger, name)
        self._name = name

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[MuxConnection]:
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._read_loop)
                tg.start_soon(self._write_loop)
                tg.start_soon(self._timer_loop)
                try:
                    yield self
                finally:
                    await self._shutdown()
                    tg.cancel_scope.cancel()
        finally:
            self._task_group = None
            self._terminate(anyio.BrokenResourceError("the connection was closed"))
            await anyio.aclose_forcefully(self._channel)

    @property
    def is_closed(self) -> bool:
        """Whether the connection has ended (by either side or by failure)."""
        return self._closed.is_set()

    @property
    def error(self) -> BaseException | None:
        """Why the connection ended, when it ended abnormally."""
        return self._error

    @property
    def last_rtt(self) -> float | None:
        """The round-trip time of the last keepalive ping, in seconds."""
        return self._last_rtt

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The channel's typed attributes."""
        return self._channel.extra_attributes

    def statistics(self) -> MuxStatistics:
        """The session's counters."""
        return self._session.statistics()

    async def wait_closed(self) -> None:
        """Wait until the connection has ended."""
        await self._closed.wait()

    async def open_stream(self, protocol: str) -> MuxStream:
        """Open a stream for ``protocol``.

        The peer learns the protocol with the first frame; if it has no handler it
        resets the stream, and our first ``receive`` raises `StreamResetError` with
        code ``UNKNOWN_PROTOCOL``.

        Raises:
            ValueError: if the protocol name is empty or too long.
            LocalProtocolError: if too many streams are open.
            anyio.BrokenResourceError: if the connection has ended.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        stream_id = self._session.open_stream(protocol)
        stream = MuxStream(self, stream_id, protocol)
        self._streams[stream_id] = stream
        self._wake()
        return stream

    async def ping(self) -> None:
        """Send a keepalive ping now; `last_rtt` updates when the pong arrives."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._session.ping(anyio.current_time())
        self._wake()

    async def aclose(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Close gracefully: send GOAWAY (flushing what is queued) and end every stream."""
        if not self._session.is_closed:
            self._session.close(code, message)
            self._wake()
        with anyio.move_on_after(2.0, shield=True):
            await self._closed.wait()
        self._terminate(anyio.BrokenResourceError("the connection was closed"))

    # -- tasks ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        session = self._session
        try:
            while True:
                message = await self._channel.receive()
                session.receive_message(message, anyio.current_time())
                self._process_events()
                if session.has_data_to_send:
                    self._wake()
        except anyio.EndOfStream:
            if not session.is_closed:
                self._log.debug("link ended without GOAWAY")
            self._terminate(anyio.BrokenResourceError("the peer closed the link"))
        except RemoteProtocolError as exc:
            self._log.warning("dropping connection: %s", exc)
            self._wake()  # flush the GOAWAY the session queued
            self._terminate(exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._terminate(exc)

    async def _timer_loop(self) -> None:
        session = self._session
        while (timer := session.get_timer()) is not None:
            await anyio.sleep_until(timer)
            now = anyio.current_time()
            due = session.get_timer()
            if due is not None and now >= due:
                session.handle_timer(now)
                self._process_events()
                self._wake()

    async def _write_loop(self) -> None:
        session = self._session
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                now = anyio.current_time()
                for message in session.data_to_send(now):
                    await self._channel.send(message)
                self._signal_drained()
                if session.is_closed:
                    with anyio.move_on_after(1.0):
                        await self._channel.send_eof()
                    self._terminate(self._error or anyio.BrokenResourceError("connection closed"))
                    return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._terminate(exc)

    def _process_events(self) -> None:
        session = self._session
        while (event := session.next_event()) is not None:
            match event:
                case DataReceived(stream_id=sid, data=data):
                    stream = self._streams.get(sid)
                    if stream is None:  # closed by our reader: return the credit, stop the sender
                        session.consume(sid, len(data))
                        session.reset_stream(
                            sid, ErrorCode.CANCELLED, "stream closed by the reader"
                        )
                    else:
                        stream._feed(data)
                case WindowUpdated(stream_id=sid):
                    if (stream := self._streams.get(sid)) is not None:
                        stream._writable.set()
                case StreamOpened(stream_id=sid, protocol=protocol):
                    self._start_handler(sid, protocol)
                case StreamEnded(stream_id=sid):
                    if (stream := self._streams.get(sid)) is not None:
                        stream._feed_eof()
                case StreamReset(stream_id=sid, code=code, message=message):
                    if (stream := self._streams.get(sid)) is not None:
                        stream._fail(StreamResetError(code, message, remote=True))
                case PongReceived(rtt=rtt):
                    self._last_rtt = rtt
                case ConnectionTerminated(code=code, message=message, remote=remote):
                    if code == ErrorCode.TIMEOUT and not remote:
                        self._log.info("peer unresponsive: %s", message or "keepalive timeout")
                        error: BaseException = TimeoutError("keepalive timeout: peer unresponsive")
                    else:
                        who = "peer" if remote else "we"
                        self._log.debug("%s closed the connection: %s %s", who, code, message)
                        error = anyio.BrokenResourceError(f"connection closed ({code!s}) {message}")
                    self._terminate(error)

    def _start_handler(self, stream_id: int, protocol: str) -> None:
        handler = self._accept(protocol)
        if handler is None or self._task_group is None:
            self._log.info("refusing stream for unknown protocol %r", protocol)
            self._session.reset_stream(
                stream_id, ErrorCode.UNKNOWN_PROTOCOL, f"no handler for protocol {protocol!r}"
            )
            return
        stream = MuxStream(self, stream_id, protocol)
        self._streams[stream_id] = stream
        self._task_group.start_soon(self._run_handler, handler, stream)

    async def _run_handler(self, handler: StreamHandler, stream: MuxStream) -> None:
        try:
            await handler(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass
        except CrdtSwarmError as exc:
            self._log.info("handler for %r failed: %s", stream.protocol, exc)
            stream.reset_nowait(ErrorCode.APPLICATION_ERROR, str(exc)[:200])
        except Exception:
            self._log.exception("handler for %r raised", stream.protocol)
            stream.reset_nowait(ErrorCode.INTERNAL_ERROR, "handler failed")
        finally:
            await stream.aclose()

    # -- helpers for streams ---------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def _wait_drained(self) -> None:
        if self._drained is None:
            self._drained = anyio.Event()
        await self._drained.wait()

    def _signal_drained(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    def _consume(self, stream_id: int, size: int) -> None:
        session = self._session
        if not session.is_closed:
            session.consume(stream_id, size)
            if session.has_data_to_send:
                self._wake()

    def _release_if_done(self, stream: MuxStream) -> None:
        if stream._is_done:
            self._forget(stream.stream_id)

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def _check_open(self) -> None:
        if self._closed.is_set() or self._session.is_closed:
            raise anyio.BrokenResourceError("the connection has ended") from self._error

    def _terminate(self, error: BaseException) -> None:
        if self._closed.is_set():
            return
        self._error = error
        self._closed.set()
        for stream in list(self._streams.values()):
            broken = anyio.BrokenResourceError(f"connection ended: {error}")
            broken.__cause__ = error
            stream._fail(broken)
        self._streams.clear()
        self._signal_drained()
        self._wake()

    async def _shutdown(self) -> None:
        if not self._closed.is_set():
            await self.aclose()
