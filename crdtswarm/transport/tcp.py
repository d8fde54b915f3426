"""The TCP transport: links are TCP connections carrying length-prefixed frames.

Each message travels as one frame of `crdtswarm.transport.framing` (a 4-byte
big-endian length, then the payload). Addresses are ``"tcp://host:port"``, with IPv6
hosts in brackets (``"tcp://[::1]:4242"``).

A `TcpLink` reads the socket in large chunks (`RECEIVE_SIZE`) and splits them with a
`FrameDecoder`; it writes each message as header and payload in one write. The
receiver enforces its own ``max_message_size``: a header announcing more is a
`FrameError` and the connection is dropped, so both ends should use the same limit.

Errors on a link:

* a header announcing a frame over the limit: ``receive`` raises `FrameError` once
  (the socket is closed), then ``anyio.BrokenResourceError``;
* the connection reset, or ended in the middle of a frame:
  ``anyio.BrokenResourceError`` (``__cause__`` says why);
* the peer's orderly close (``send_eof`` or ``aclose``) at a frame boundary:
  ``anyio.EndOfStream`` once every message has been received.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar, Final

import anyio
import ifaddr
from anyio.abc import SocketAttribute, SocketListener
from anyio.lowlevel import checkpoint_if_cancelled

from crdtswarm.errors import ConnectError, FrameError
from crdtswarm.transport.abc import Link, LinkAttribute, LinkHandler, Transport, check_message_size
from crdtswarm.transport.framing import FrameDecoder

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from anyio.abc import SocketStream, TaskGroup, TaskStatus

    from crdtswarm.identity import PublicKey

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "RECEIVE_SIZE",
    "TcpLink",
    "TcpTransport",
    "format_address",
    "parse_address",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE: Final = (1 << 20) + 64
"""Default largest message on a TCP link: 1 MiB plus room for a record header."""
RECEIVE_SIZE: Final = 256 * 1024
"""Bytes asked of the socket per read (asyncio's own read size, so chunks are never split)."""

_SCHEME: Final = "tcp"
_PREFIX: Final = "tcp://"
_HEADER: Final = struct.Struct(">I")
# accept() errors that say nothing about the listener itself: drop that one connection.
_ACCEPT_RETRY: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
# accept() errors from resource exhaustion: back off and retry (trio's serve_listeners).
_ACCEPT_BACKOFF: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF_INTERVAL: Final = 0.1


def format_address(host: str, port: int) -> str:
    """``"tcp://host:port"``, with an IPv6 ``host`` in brackets."""
    if ":" in host:
        return f"{_PREFIX}[{host}]:{port}"
    return f"{_PREFIX}{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"tcp://host:port"`` (or ``"tcp://[v6]:port"``) into ``(host, port)``.

    Raises:
        ValueError: if ``address`` is not of that form, or the port is not 1 to 65535.
    """
    if not isinstance(address, str) or not address.startswith(_PREFIX):
        raise ValueError(f"not a TCP address (tcp://host:port): {address!r}")
    rest = address[len(_PREFIX) :]
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad TCP address {address!r}: expected tcp://[ipv6]:port")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"bad TCP address {address!r}: {host!r} is not IPv6") from None
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"bad TCP address {address!r}: expected tcp://host:port")
    if not host or any(c.isspace() or c in "/?#@[]" for c in host):
        raise ValueError(f"bad TCP address {address!r}: bad host {host!r}")
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"bad TCP address {address!r}: port must be 1 to 65535")
    return host, int(port_text)


def _dialable(sockaddr: object) -> list[str]:
    """The addresses others can dial for a bound socket address.

    A wildcard (``0.0.0.0`` or ``::``) becomes this machine's interface addresses of
    that family, loopback last (link-local IPv6 left out: it needs a scope).
    """
    address = _format_sockaddr(sockaddr)
    host, port = sockaddr[0], sockaddr[1]  # type: ignore[index]
    if host not in ("0.0.0.0", "::"):
        return [address]
    family = ipaddress.IPv4Address if host == "0.0.0.0" else ipaddress.IPv6Address
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                parsed = family(raw)
            except ValueError:
                continue
            if not parsed.is_link_local and parsed not in found:
                found.append(parsed)
    found.sort(key=lambda a: (a.is_loopback, a.packed))
    return [format_address(str(a), port) for a in found] or [address]


def _format_sockaddr(sockaddr: object) -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return format_address(str(sockaddr[0]), int(sockaddr[1]))
    return f"{_PREFIX}{sockaddr}"


def _socket_address(stream: SocketStream, attribute: Any) -> str:
    try:
        return _format_sockaddr(stream.extra(attribute))
    except (OSError, anyio.TypedAttributeLookupError):
        return f"{_PREFIX}?"


class TcpLink(Link):
    """A link over one TCP connection; made by `TcpTransport`.

    Several tasks may send at once (each message is written whole) and several may
    receive at once. Besides the `LinkAttribute` values, ``extra`` gives the
    connection's ``anyio.abc.SocketAttribute`` values.

    Args:
        stream: the connected socket; the link owns it.
        max_message_size: the largest message, in bytes, sent or accepted.
    """

    def __init__(self, stream: SocketStream, *, max_message_size: int) -> None:
        if max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, not {max_message_size}")
        self._stream = stream
        self._max_message_size = max_message_size
        self._decoder = FrameDecoder(max_message_size)
        self._frames: deque[bytes] = deque()
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._receive_lock = anyio.Lock(fast_acquire=True)
        self._closed = False
        self._eof_sent = False
        self._eof_received = False
        self._broken: BaseException | None = None
        self._frame_error_raised = False
        self._stash: bytes | None = None  # a chunk read by _pause_read_ahead
        self._on_close: Callable[[TcpLink], None] | None = None
        self._local_address = _socket_address(stream, SocketAttribute.local_address)
        self._remote_address = _socket_address(stream, SocketAttribute.remote_address)

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes, that `send` accepts and `receive` allows."""
        return self._max_message_size

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The socket's attributes plus `LinkAttribute` (``"tcp"``, ``"tcp://host:port"``)."""
        local = self._local_address
        remote = self._remote_address
        return {
            **self._stream.extra_attributes,
            LinkAttribute.transport: lambda: _SCHEME,
            LinkAttribute.local_address: lambda: local,
            LinkAttribute.remote_address: lambda: remote,
        }

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken is not None:
            raise anyio.BrokenResourceError from self._broken

    async def send(self, item: bytes) -> None:
        """Send one message as one frame; waits while the socket's buffers are full.

        Raises:
            ValueError: if ``item`` is longer than `max_message_size` (nothing is sent).
            anyio.ClosedResourceError: if this end was closed or sent EOF.
            anyio.BrokenResourceError: if the connection broke.
        """
        self._raise_if_unusable()
        if self._eof_sent:
            raise anyio.ClosedResourceError("this side already sent EOF")
        size = len(item)
        check_message_size(size, self._max_message_size)
        # One write per frame: a cancellation can never separate a header from its
        # payload, and small messages go out in one segment. Copying the payload once
        # costs less than a second write (a syscall and a yield), even at 1 MiB.
        frame = _HEADER.pack(size) + item
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case; stream.send() is the checkpoint
        except anyio.WouldBlock:
            await lock.acquire()
        try:
            self._raise_if_unusable()
            with self._socket_errors():
                await self._stream.send(frame)
        finally:
            lock.release()

    @contextlib.contextmanager
    def _socket_errors(self) -> Iterator[None]:
        """Map the socket's errors: our own close stays Closed, anything else is Broken."""
        try:
            yield
        except anyio.ClosedResourceError:
            if self._closed:
                raise
            raise anyio.BrokenResourceError from self._broken
        except anyio.BrokenResourceError as exc:
            self._broken = exc.__cause__ or exc
            raise

    async def receive(self) -> bytes:
        """Receive the next message.

        A message already read from the socket is returned without yielding to the
        event loop (as anyio's buffered streams do), unless the task is cancelled; at
        most one read's worth of messages (`RECEIVE_SIZE` bytes) is returned this way.

        Raises:
            crdtswarm.errors.FrameError: if the peer announced a frame larger than
                `max_message_size`; the connection is closed.
            anyio.EndOfStream: when the peer closed its sending side at a frame boundary
                and every message has been received.
            anyio.ClosedResourceError: if this end was closed.
            anyio.BrokenResourceError: if the connection broke, or ended mid-frame.
        """
        if self._frames:
            await checkpoint_if_cancelled()
            if self._closed:
                raise anyio.ClosedResourceError
            if self._frames:  # still there: checkpoint_if_cancelled() did not yield
                return self._frames.popleft()
        lock = self._receive_lock
        try:
            lock.acquire_nowait()
        except anyio.WouldBlock:
            await lock.acquire()
        try:
            return await self._receive_frame()
        finally:
            lock.release()

    async def _receive_frame(self) -> bytes:
        # Called with the receive lock held: the only task reading the stream.
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._frames:  # read by the task that held the lock before us
                return self._frames.popleft()
            if self._decoder.error is not None and not self._frame_error_raised:
                self._frame_error_raised = True
                raise self._decoder.error
            self._raise_if_unusable()
            if self._eof_received:
                raise anyio.EndOfStream
            try:
                if self._stash is not None:
                    chunk, self._stash = self._stash, None
                else:
                    with self._socket_errors():
                        chunk = await self._stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                if not self._decoder.is_at_frame_boundary:
                    self._broken = FrameError(
                        "the connection ended in the middle of a frame "
                        f"({self._decoder.buffered_size} bytes of it received)"
                    )
                    raise anyio.BrokenResourceError from self._broken
                self._eof_received = True
                raise
            try:
                frames = self._decoder.feed(chunk)
            except FrameError as exc:
                # Stop reading at once, but deliver the frames before the bad header.
                self._broken = exc
                await anyio.aclose_forcefully(self._stream)
                frames = self._decoder.frames_before_error
            if frames:
                self._frames.extend(frames)
                return self._frames.popleft()

    async def _pause_read_ahead(self) -> None:
        """Stop the socket being read before we ask for data; call right after accepting.

        On asyncio, anyio pauses reading only inside ``receive``: a stream from
        ``accept()`` starts out reading, and would buffer whatever the peer sends, without
        bound, until the first ``receive`` finds nothing to take. A ``receive`` cancelled
        before it starts waiting pauses the transport and takes nothing, unless a chunk
        was already on its way, which is kept for the next `receive`.
        """
        with anyio.CancelScope() as scope:
            scope.cancel()
            # On EOF or a break, the stream keeps that state: the next receive() meets it.
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                self._stash = await self._stream.receive(RECEIVE_SIZE)

    async def send_eof(self) -> None:
        """Shut down the sending direction (TCP FIN) after everything sent so far.

        Receiving still works. Later sends raise ``anyio.ClosedResourceError``.

        Raises:
            anyio.ClosedResourceError: if this end was closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            return
        self._eof_sent = True
        await self._stream.send_eof()

    async def aclose(self) -> None:
        """Close the connection.

        Tasks of ours still using the link get ``anyio.ClosedResourceError``. The peer
        gets every message sent so far and then EOF, unless we left data of theirs
        unread (then the kernel resets the connection and they may see
        ``anyio.BrokenResourceError``).
        """
        if not self._closed:
            self._closed = True
            self._frames.clear()
            if self._on_close is not None:
                self._on_close(self)
        await self._stream.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TcpLink {self._local_address} -> {self._remote_address} {state}>"


class TcpTransport(Transport):
    """Dials and serves links over TCP.

    Args:
        host: the interface to listen on (default ``"127.0.0.1"``).
        port: the port to listen on; 0 (the default) picks a free one.
        max_message_size: the largest message in bytes on its links, sent or accepted
            (default 1 MiB + 64).
        connect_timeout: seconds a dial may take before failing (default 10.0).
        announce: the addresses to tell others (``"tcp://host:port"``), for example
            a public address that a router forwards to this node. By default the
            listened address, and for a wildcard host (``"0.0.0.0"``, ``"::"``, ``""``)
            this machine's interface addresses with the bound port.

    Raises:
        ValueError: if a number is out of range or an announced address is malformed.
    """

    scheme: ClassVar[str] = _SCHEME

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 10.0,
        announce: Sequence[str] = (),
    ) -> None:
        for address in announce:
            parse_address(address)
        if not 0 <= port < 65536:
            raise ValueError(f"port must be 0 to 65535, not {port}")
        if max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, not {max_message_size}")
        if not (connect_timeout > 0 and not math.isnan(connect_timeout)):
            raise ValueError(f"connect_timeout must be > 0 seconds, not {connect_timeout}")
        self._host = host
        self._port = port
        self._max_message_size = max_message_size
        self._connect_timeout = connect_timeout
        self._announce = list(announce)
        self._addresses: list[str] = []
        self._serving = False
        self._accepted: set[TcpLink] = set()

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes, on this transport's links."""
        return self._max_message_size

    @property
    def addresses(self) -> list[str]:
        """Where others can dial us while serving (see ``announce``), else empty."""
        return list(self._addresses)

    async def serve(
        self,
        local_key: PublicKey,
        handler: LinkHandler,
        *,
        task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``(host, port)`` and serve links until cancelled; see `Transport.serve`.

        ``local_key`` is not used: TCP reaches nodes by address.

        Raises:
            OSError: if the transport cannot listen (for example, the port is in use).
            RuntimeError: if this transport is already serving.
        """
        if self._serving:
            raise RuntimeError("this transport is already serving")
        self._serving = True
        try:
            listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
            try:
                addresses: list[str] = list(self._announce)
                for sub in [] if addresses else listener.listeners:
                    bound = sub.extra(SocketAttribute.local_address)
                    for address in _dialable(bound):
                        if address not in addresses:
                            addresses.append(address)
                async with anyio.create_task_group() as task_group:
                    for sub in listener.listeners:
                        if not isinstance(sub, SocketListener):  # pragma: no cover
                            raise TypeError(f"unexpected listener {sub!r}")
                        task_group.start_soon(self._accept_loop, sub, handler, task_group)
                    self._addresses = addresses
                    task_status.started(list(addresses))
            finally:
                self._addresses = []
                with anyio.CancelScope(shield=True):
                    for link in list(self._accepted):
                        await link.aclose()
                    await listener.aclose()
        finally:
            self._serving = False

    async def _accept_loop(
        self, listener: SocketListener, handler: LinkHandler, task_group: TaskGroup
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    continue
                if exc.errno in _ACCEPT_BACKOFF:
                    logger.warning("accept() failed, backing off: %s", exc)
                    await anyio.sleep(_ACCEPT_BACKOFF_INTERVAL)
                    continue
                raise
            try:
                link = TcpLink(stream, max_message_size=self._max_message_size)
                await link._pause_read_ahead()  # at once: no yield since accept() returned
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
            link._on_close = self._accepted.discard
            self._accepted.add(link)
            task_group.start_soon(self._run_handler, handler, link, name=f"tcp {link!r}")

    async def _run_handler(self, handler: LinkHandler, link: TcpLink) -> None:
        try:
            await handler(link)
        except Exception:
            logger.exception("link handler failed on %r", link)
            await anyio.aclose_forcefully(link)

    async def dial(self, remote_key: PublicKey, address: str | None = None) -> TcpLink:
        """Connect to ``address`` (``"tcp://host:port"``); ``remote_key`` is not checked here.

        Raises:
            crdtswarm.errors.ConnectError: if the connection is refused, the host is
                unreachable or unknown, or it takes longer than ``connect_timeout``.
            ValueError: if ``address`` is None or not a ``tcp://host:port`` address.
        """
        if address is None:
            raise ValueError("the TCP transport needs an address to dial")
        host, port = parse_address(address)
        try:
            with anyio.fail_after(self._connect_timeout):
                stream = await anyio.connect_tcp(host, port)
        except TimeoutError as exc:
            raise ConnectError(
                f"connecting to {address} timed out after {self._connect_timeout} s"
            ) from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {address}: {exc}") from exc
        try:
            raw = stream.extra(SocketAttribute.raw_socket)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return TcpLink(stream, max_message_size=self._max_message_size)
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
