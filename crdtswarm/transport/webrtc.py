"""The WebRTC transport: each link is an aiortc peer connection with one data channel.

Nodes are reached by public key (``"webrtc://<key>"``). A dial is one offer/answer
exchange carried by a `Signaler` that the owner attaches (the swarm's signaling
client, an in-swarm relay, a test double); the other node's transport gets the
payload through `WebRTCTransport.receive_signal`. aiortc gathers every ICE candidate
before ``setLocalDescription`` returns, so one offer and one answer suffice (no
trickle ICE). A signal payload is compact UTF-8 JSON, opaque to the signaler::

    {"v": 1, "t": "offer" | "answer", "id": "<16 hex digits: the dial>", "sdp": "...",
     "mms": <max message size>, "win": <receive window>}

Each peer connection carries one reliable, ordered data channel, pre-negotiated
(``negotiated=True, id=0``: no in-band open round trip). Every data channel message
is a *chunk*: one kind byte, then its payload:

    ``0`` PART (a message continues) · ``1`` END (the last or only chunk of a message)
    · ``2`` EOF (no more messages) · ``3`` CREDIT (u32be: bytes the reader grants)

Rules that hold for every link:

* Rule 1 (size): a message is at most ``min(our, their) max_message_size`` bytes;
  `WebRTCLink.send` refuses a larger one with ``ValueError`` before sending anything;
  a peer that sends a larger one breaks the link (``FrameError`` as the cause).
* Rule 2 (credit): aiortc delivers whatever arrives through a callback, without
  flow control, so the link brings its own. A message costs its length plus
  `MESSAGE_COST`; the reader starts by granting its ``max_receive_buffer_size`` (the
  ``"win"`` of its signal) and grants again what ``receive`` takes, in CREDIT chunks
  of at least half that window. ``send`` waits until the whole message is covered,
  then hands every chunk to aiortc at once: a cancelled ``send`` sends all or nothing,
  and a reader never holds more than its window (a peer overrunning it breaks the
  link with ``FlowControlError`` as the cause).
* Rule 3 (local buffer): ``send`` also waits while the channel's ``bufferedAmount``
  is above ``send_high_watermark``, woken by aiortc's ``bufferedamountlow`` event at
  ``send_low_watermark``; aiortc's queue holds at most the high watermark plus one
  message.
* Rule 4 (EOF and close): ``send_eof`` sends EOF after every message; ``aclose``
  sends EOF, closes the channel (an SCTP stream reset, done once the peer has taken
  every chunk) and waits up to ``close_timeout`` for that before closing the peer
  connection. The reader gets every message, then ``EndOfStream``. An abortive close
  (``aclose`` in a cancelled scope, as ``anyio.aclose_forcefully`` does, or `serve`
  ending) closes the peer connection at once: the peer gets ``BrokenResourceError``
  after the messages it already holds.
* Rule 5 (breakage): the channel closing without EOF, ICE or DTLS failing, or the
  peer connection closing makes the link broken (``BrokenResourceError``, the cause
  says which); our own close makes it closed (``ClosedResourceError``).
* Rule 6 (cleanup): every peer connection is closed (``await pc.close()``, shielded)
  by a failed, timed-out or cancelled dial or answer, by ``aclose``, and by `serve`
  ending, which aborts every link it accepted and every answer in progress.

Security: aiortc checks the peer's DTLS certificate against the fingerprint in the
SDP of the signal, so a link is as authentic as its signals. The transport does not
authenticate signals itself: the signaler must (crdtswarm's seals them to the
recipient and signs them), and the Noise handshake run above every link proves both
identities whatever the transport.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import secrets
import struct
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol

import anyio
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcicetransport import parse_stun_turn_uri
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint, checkpoint_if_cancelled

from crdtswarm.errors import ConnectError, FlowControlError, FrameError
from crdtswarm.identity import InvalidKeyError, PublicKey
from crdtswarm.transport.abc import Link, LinkAttribute, LinkHandler, Transport, check_message_size
from crdtswarm.transport.tcp import DEFAULT_MAX_MESSAGE_SIZE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from anyio.abc import TaskGroup, TaskStatus

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MESSAGE_COST",
    "IceServer",
    "Signaler",
    "WebRTCConfig",
    "WebRTCLink",
    "WebRTCStatistics",
    "WebRTCTransport",
]

logger = logging.getLogger(__name__)

MESSAGE_COST: Final = 64
"""Bytes a message counts for in the reader's window on top of its length (Rule 2)."""
MAX_SIGNAL_SIZE: Final = 64 * 1024
"""Largest signal payload `WebRTCTransport.receive_signal` accepts, in bytes."""

_SCHEME: Final = "webrtc"
_PREFIX: Final = "webrtc://"
_PART: Final = b"\x00"
_END: Final = b"\x01"
_EOF: Final = b"\x02"
_CREDIT: Final = struct.Struct(">BI")  # kind 3, then the granted bytes
_MAX_WINDOW: Final = 0x7FFF_FFFF
_DIAL_ID: Final = re.compile(r"[0-9a-f]{16}")
_FINGERPRINT: Final = re.compile(r"^a=fingerprint:sha-256 ([0-9A-Fa-f:]+)\s*$", re.MULTILINE)
_PC_CLOSE_TIMEOUT: Final = 10.0  # a bound on aiortc's close, which should take milliseconds


class Signaler(Protocol):
    """Carries signal payloads to the WebRTC transport of another node.

    The payloads are opaque bytes. An implementation should authenticate them (seal
    and sign): the DTLS fingerprint inside is what binds a link to the node.
    """

    async def send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
        """Deliver ``payload`` to the WebRTC transport of node ``remote_key``.

        Raises:
            crdtswarm.errors.ConnectError: when it cannot.
        """


@dataclass(frozen=True, slots=True)
class IceServer:
    """A STUN or TURN server, e.g. ``IceServer("turn:host:3478?transport=tcp", "u", "p")``.

    aioice uses the first STUN URL and the first TURN URL of all servers given to a
    transport; further ones are ignored.

    Raises:
        ValueError: if a URL is not a ``stun:``, ``stuns:``, ``turn:`` or ``turns:`` URL.
    """

    urls: str | tuple[str, ...]
    """One URL or several: ``"stun:host:3478"``, ``"turn:host:3478?transport=tcp"``."""
    username: str | None = None
    """The TURN username (None for STUN)."""
    credential: str | None = None
    """The TURN password (None for STUN)."""

    def __post_init__(self) -> None:
        for url in (self.urls,) if isinstance(self.urls, str) else self.urls:
            try:
                parsed = parse_stun_turn_uri(url)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"bad ICE server URL {url!r}: {exc}") from None
            # aiortc would skip these silently
            transport = parsed.get("transport")
            if transport not in (None, "tcp") and (parsed["scheme"], transport) != ("turn", "udp"):
                raise ValueError(f"bad ICE server URL {url!r}: transport {transport!r}")

    def to_aiortc(self) -> RTCIceServer:
        """This server as aiortc's ``RTCIceServer``."""
        urls = self.urls if isinstance(self.urls, str) else list(self.urls)
        return RTCIceServer(urls=urls, username=self.username, credential=self.credential)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebRTCConfig:
    """Limits and timeouts of a `WebRTCTransport` and its links.

    Raises:
        ValueError: if a value is out of range.
    """

    connect_timeout: float = 30.0
    """Seconds a dial, or the answer to an offer, may take in all (default 30.0)."""
    close_timeout: float = 5.0
    """Seconds ``aclose`` waits for the peer to take every chunk before closing the
    peer connection anyway (default 5.0)."""
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    """Largest message in bytes, sent or received; a link uses the smaller of both
    ends' (default 1 MiB + 64, as TCP)."""
    max_receive_buffer_size: int = 4 * 1024 * 1024
    """Bytes of messages (each counted as its length + `MESSAGE_COST`) a link holds
    for ``receive``; the peer's ``send`` waits beyond that (Rule 2). At least
    ``max_message_size + MESSAGE_COST`` (default 4 MiB)."""
    send_high_watermark: int = 1024 * 1024
    """``send`` waits while aiortc's channel buffer holds more bytes than this
    (default 1 MiB)."""
    send_low_watermark: int = 256 * 1024
    """Once waiting, ``send`` waits until aiortc's buffer holds this many bytes or
    fewer (default 256 KiB)."""
    chunk_size: int = 65536
    """Largest data channel message in bytes, header included; at most 65536, the
    size every WebRTC peer accepts (default 65536: 5% faster than 16 KiB on loopback)."""
    max_pending_answers: int = 32
    """Offers answered at once; further offers are dropped until one completes
    (default 32)."""
    relay_only: bool = False
    """Use TURN relay candidates only (ICE policy ``"relay"``; default False)."""

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "close_timeout"):
            value = getattr(self, name)
            if not (value > 0 and not math.isnan(value)):
                raise ValueError(f"{name} must be > 0 seconds, not {value}")
        if self.max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, not {self.max_message_size}")
        least = self.max_message_size + MESSAGE_COST
        if not least <= self.max_receive_buffer_size <= _MAX_WINDOW:
            raise ValueError(
                f"max_receive_buffer_size must be {least} to {_MAX_WINDOW} "
                f"(max_message_size + {MESSAGE_COST} or more), not {self.max_receive_buffer_size}"
            )
        if not 0 <= self.send_low_watermark <= self.send_high_watermark:
            raise ValueError(
                "watermarks must satisfy 0 <= send_low_watermark <= send_high_watermark"
            )
        if not 2 <= self.chunk_size <= 65536:
            raise ValueError(f"chunk_size must be 2 to 65536, not {self.chunk_size}")
        if self.max_pending_answers < 1:
            raise ValueError(f"max_pending_answers must be >= 1, not {self.max_pending_answers}")


@dataclass(frozen=True, slots=True, kw_only=True)
class WebRTCStatistics:
    """Counters of one `WebRTCTransport`, from `WebRTCTransport.statistics`."""

    peer_connections: int
    """RTCPeerConnections made by this transport and not closed yet."""
    pending_dials: int
    """Dials waiting for their answer or for their channel to open."""
    pending_answers: int
    """Offers being answered (at most ``max_pending_answers``)."""
    accepted_links: int
    """Links handed to the serve handler and still open."""
    signals_dropped: int
    """Signals dropped: malformed, unexpected, duplicated or over the answer limit."""


@dataclass(frozen=True, slots=True)
class _Signal:
    kind: Literal["offer", "answer"]
    dial_id: str
    sdp: str
    max_message_size: int
    window: int


def _encode_signal(kind: str, dial_id: str, sdp: str, config: WebRTCConfig) -> bytes:
    body = {
        "v": 1,
        "t": kind,
        "id": dial_id,
        "sdp": sdp,
        "mms": config.max_message_size,
        "win": config.max_receive_buffer_size,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _decode_signal(payload: bytes) -> _Signal:
    """Parse a signal payload; raise ValueError saying what is wrong with it."""
    if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_SIGNAL_SIZE:
        raise ValueError(f"not bytes, or over {MAX_SIGNAL_SIZE} bytes")
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != 1:
        raise ValueError("not a version 1 signal")
    kind, dial_id, sdp = body.get("t"), body.get("id"), body.get("sdp")
    mms, window = body.get("mms"), body.get("win")
    if kind not in ("offer", "answer"):
        raise ValueError(f"unknown signal type {kind!r}")
    if not (isinstance(dial_id, str) and _DIAL_ID.fullmatch(dial_id)):
        raise ValueError(f"bad dial id {dial_id!r}")
    if not (isinstance(sdp, str) and sdp):
        raise ValueError("no SDP")
    if type(mms) is not int or not 0 <= mms <= 0xFFFF_FFFF:
        raise ValueError(f"bad max message size {mms!r}")
    if type(window) is not int or not MESSAGE_COST <= window <= 0xFFFF_FFFF:
        raise ValueError(f"bad window {window!r}")
    return _Signal(kind, dial_id, sdp, mms, window)


def _address(key: PublicKey) -> str:
    return f"{_PREFIX}{key}"


def _parse_address(address: str) -> PublicKey:
    if not isinstance(address, str) or not address.startswith(_PREFIX):
        raise ValueError(f"not a WebRTC address (webrtc://<public key>): {address!r}")
    try:
        return PublicKey.parse(address[len(_PREFIX) :])
    except InvalidKeyError as exc:
        raise ValueError(f"bad WebRTC address {address!r}: {exc}") from None


def _candidate_types(pc: RTCPeerConnection) -> tuple[str, str]:
    """(local, remote) type of the nominated ICE pair: ``"host"``, ``"srflx"``, ``"relay"``."""
    try:  # aiortc has no API for the selected pair: read aioice's nominated pair
        ice: Any = pc.sctp.transport.transport if pc.sctp is not None else None
        pair: Any = ice._connection._nominated[1]
        return str(pair.local_candidate.type), str(pair.remote_candidate.type)
    except (AttributeError, KeyError, TypeError):
        return "unknown", "unknown"


class _Waker:
    """Wakes every task waiting on it; they re-check their condition afterwards."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None


class WebRTCLink(Link):
    """A link over one data channel of an aiortc peer connection; made by `WebRTCTransport`.

    Follows the rules of the module docstring. Several tasks may send (or receive) at
    once; each message is delivered whole.
    """

    def __init__(
        self,
        pc: RTCPeerConnection,
        *,
        local_key: PublicKey,
        remote_key: PublicKey,
        config: WebRTCConfig,
        on_close: Callable[[WebRTCLink], None],
    ) -> None:
        self._pc = pc
        self._config = config
        self._local_key = local_key
        self._remote_key = remote_key
        self._on_close: Callable[[WebRTCLink], None] | None = on_close
        self._channel = channel = pc.createDataChannel("crdtswarm", negotiated=True, id=0)
        channel.bufferedAmountLowThreshold = config.send_low_watermark
        self._readable = _Waker()  # messages, EOF, open, close, failure
        self._writable = _Waker()  # credit, buffer drained, close, failure
        self._messages: deque[bytes] = deque()
        self._parts: list[bytes] = []  # PART chunks of the message being received
        self._partial = 0  # payload bytes in _parts
        self._buffered = 0  # cost of _messages (Rule 2)
        self._ungranted = 0  # cost received by the reader and not yet granted back
        self._grant_threshold = 0
        self._credit = 0
        self._peer_window = 0
        self._max_message_size = config.max_message_size
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._closed = False
        self._torn_down = False
        self._eof_sent = False
        self._eof_received = False
        self._broken: BaseException | None = None
        self._candidate_types = ("unknown", "unknown")
        channel.on("open", self._on_open)
        channel.on("message", self._on_message)
        channel.on("close", self._on_channel_close)
        channel.on("bufferedamountlow", self._writable.wake)
        pc.on("connectionstatechange", self._on_connection_state)

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes, that `send` accepts (both ends' smaller limit)."""
        return self._max_message_size

    @property
    def local_key(self) -> PublicKey:
        """The public key of the node at this end."""
        return self._local_key

    @property
    def remote_key(self) -> PublicKey:
        """The public key of the node at the other end (as the signaler names it)."""
        return self._remote_key

    @property
    def candidate_types(self) -> tuple[str, str]:
        """ICE types of the (local, remote) candidates in use.

        Each is ``"host"``, ``"srflx"``, ``"prflx"`` or ``"relay"`` (``"unknown"``
        before the link is up).
        """
        return self._candidate_types

    @property
    def remote_fingerprint(self) -> str | None:
        """The peer's DTLS certificate SHA-256 fingerprint, as its signal announced it."""
        description = self._pc.remoteDescription
        match = _FINGERPRINT.search(description.sdp) if description is not None else None
        return match.group(1).upper() if match else None

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """`LinkAttribute` values: scheme ``"webrtc"`` and ``"webrtc://<key>"`` addresses."""
        local, remote = _address(self._local_key), _address(self._remote_key)
        return {
            LinkAttribute.transport: lambda: _SCHEME,
            LinkAttribute.local_address: lambda: local,
            LinkAttribute.remote_address: lambda: remote,
        }

    # -- set-up (used by WebRTCTransport) --------------------------------------------

    def _set_limits(self, peer_max_message_size: int, peer_window: int) -> None:
        size = min(self._config.max_message_size, peer_max_message_size, peer_window - MESSAGE_COST)
        self._max_message_size = size
        self._credit = self._peer_window = peer_window
        # Granting at `window - largest cost` at the latest keeps a blocked sender able to
        # send the largest message once the reader has taken everything (Rule 2).
        window = self._config.max_receive_buffer_size
        self._grant_threshold = max(0, min(window // 2, window - size - MESSAGE_COST))

    async def _wait_open(self) -> None:
        while self._channel.readyState != "open":
            if self._broken is not None:
                raise ConnectError(f"no link to {self._remote_key.short}: {self._broken}") from (
                    self._broken
                )
            await self._readable.wait()

    # -- aiortc callbacks: synchronous, and must never raise into aiortc -------------

    def _on_open(self) -> None:
        self._candidate_types = _candidate_types(self._pc)
        self._readable.wake()

    def _on_message(self, data: Any) -> None:
        if self._closed:  # closing: nothing more for us
            return
        try:
            self._take_chunk(data)
        except (FrameError, FlowControlError) as exc:
            logger.warning("breaking the link with %s: %s", self._remote_key.short, exc)
            self._fail(exc, violation=True)
        except Exception as exc:  # a bug of ours: break the link, not aiortc
            logger.exception("breaking the link with %s", self._remote_key.short)
            self._fail(exc, violation=True)

    def _take_chunk(self, data: bytes | str) -> None:
        if not isinstance(data, bytes) or not data:
            raise FrameError("the peer sent a text or empty data channel message")
        kind = data[0]
        if kind == 3:  # CREDIT
            if len(data) != _CREDIT.size:
                raise FrameError(f"a CREDIT chunk of {len(data)} bytes")
            self._credit += _CREDIT.unpack(data)[1]
            if self._credit > self._peer_window:
                raise FlowControlError("the peer granted more credit than its window")
            self._writable.wake()
            return
        if self._eof_received:
            raise FrameError("the peer sent a chunk after EOF")
        if kind == 2:  # EOF
            self._eof_received = True
            self._readable.wake()
            return
        if kind > 1:
            raise FrameError(f"unknown chunk kind {kind}")
        size = self._partial + len(data) - 1
        if size > self._max_message_size:
            raise FrameError(f"a message over max_message_size={self._max_message_size}")
        if self._buffered + size + kind * MESSAGE_COST > self._config.max_receive_buffer_size:
            raise FlowControlError("the peer sent more than its credit")
        if kind == 0:  # PART
            self._parts.append(data)
            self._partial = size
            return
        if self._parts:
            self._parts.append(data)
            message = b"".join([memoryview(part)[1:] for part in self._parts])
            self._parts = []
            self._partial = 0
        else:
            message = data[1:]
        self._buffered += size + MESSAGE_COST
        self._messages.append(message)
        self._readable.wake()

    def _on_channel_close(self) -> None:
        if not self._eof_received:
            self._fail(
                ConnectionResetError(errno.ECONNRESET, "the data channel closed without EOF")
            )
        self._readable.wake()
        self._writable.wake()

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        if state == "failed":
            if self._pc.iceConnectionState == "failed":
                self._fail(
                    ConnectionError("ICE failed: no candidate pair works (or consent expired)")
                )
            else:
                self._fail(ConnectionError("DTLS failed: handshake or certificate fingerprint"))
        elif state == "closed" and not self._closed:
            self._fail(ConnectionResetError(errno.ECONNRESET, "the peer connection closed"))

    def _fail(self, cause: BaseException, *, violation: bool = False) -> None:
        if self._broken is None:
            self._broken = cause
        if violation:  # drop everything and tell the peer (its channel closes without EOF)
            self._messages.clear()
            self._parts = []
            if self._channel.readyState == "open":
                self._channel.close()
        self._readable.wake()
        self._writable.wake()

    # -- the Link API --------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            raise anyio.ClosedResourceError("this side already sent EOF")
        if self._broken is not None:
            raise anyio.BrokenResourceError from self._broken
        if self._channel.readyState != "open":
            raise anyio.BrokenResourceError from ConnectionResetError(
                errno.ECONNRESET, "the peer closed the link"
            )

    async def send(self, item: bytes) -> None:
        """Send one message; waits for the reader's credit and for aiortc's buffer to drain.

        Raises:
            ValueError: if ``item`` is longer than `max_message_size` (nothing is sent).
            anyio.ClosedResourceError: if this end was closed or sent EOF.
            anyio.BrokenResourceError: if the peer closed the link or the connection failed.
        """
        await checkpoint_if_cancelled()
        self._check_send()
        size = len(item)
        check_message_size(size, self._max_message_size)
        cost = size + MESSAGE_COST
        high = self._config.send_high_watermark
        waited = False
        async with self._send_lock:  # senders in turn: a big message is not starved
            while self._credit < cost or self._channel.bufferedAmount > high:
                waited = True
                await self._writable.wait()
                self._check_send()
            self._credit -= cost
            # No await from here on: all chunks or none (Rule 2).
            channel, limit = self._channel, self._config.chunk_size - 1
            if size <= limit:
                channel.send(_END + item)
            else:
                view = memoryview(item)
                for start in range(0, size, limit):
                    end = start + limit
                    channel.send((_END if end >= size else _PART) + view[start:end])
        if not waited:
            await cancel_shielded_checkpoint()

    async def receive(self) -> bytes:
        """Receive the next message.

        Raises:
            anyio.EndOfStream: once the peer sent EOF (or closed) and every message it
                sent has been received.
            anyio.ClosedResourceError: if this end was closed.
            anyio.BrokenResourceError: if the peer aborted, the connection failed or the
                peer broke the protocol (after the messages already received, except for
                a protocol violation).
        """
        await checkpoint()
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._messages:
                message = self._messages.popleft()
                self._taken(len(message) + MESSAGE_COST)
                return message
            if self._eof_received:
                raise anyio.EndOfStream
            if self._broken is not None:
                raise anyio.BrokenResourceError from self._broken
            await self._readable.wait()

    def _taken(self, cost: int) -> None:
        self._buffered -= cost
        self._ungranted += cost
        if (
            self._ungranted >= self._grant_threshold
            and not self._eof_received
            and self._channel.readyState == "open"
        ):
            self._channel.send(_CREDIT.pack(3, self._ungranted))
            self._ungranted = 0

    async def send_eof(self) -> None:
        """Finish the sending direction: the peer gets EOF after every message sent so far.

        Receiving still works. Later sends raise ``anyio.ClosedResourceError``.

        Raises:
            anyio.ClosedResourceError: if this end was closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if not self._eof_sent:
            self._eof_sent = True
            if self._broken is None and self._channel.readyState == "open":
                self._channel.send(_EOF)
            self._writable.wake()
        await checkpoint()

    async def aclose(self) -> None:
        """Close the link: the peer gets every message sent so far, then EOF (Rule 4).

        Waits up to ``close_timeout`` for the peer to take them. Called in a cancelled
        scope (``anyio.aclose_forcefully``), the close is abortive: the peer gets
        ``BrokenResourceError``. Tasks of ours still using the link get
        ``anyio.ClosedResourceError``.
        """
        await self._close(abort=anyio.current_effective_deadline() == -math.inf)

    async def _close(self, *, abort: bool) -> None:
        graceful = not (abort or self._closed) and self._broken is None
        graceful = graceful and self._channel.readyState == "open"
        if not self._closed:
            self._closed = True
            self._messages.clear()
            self._parts = []
            self._readable.wake()
            self._writable.wake()
        try:
            if graceful:
                if not self._eof_sent:
                    self._eof_sent = True
                    self._channel.send(_EOF)
                self._channel.close()  # a stream reset, after every queued chunk
                with anyio.move_on_after(self._config.close_timeout):
                    while self._channel.readyState != "closed" and self._broken is None:
                        await self._readable.wait()
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        with anyio.move_on_after(_PC_CLOSE_TIMEOUT, shield=True) as scope:
            try:
                await self._pc.close()
            except Exception:  # aiortc failing to close: the connection is gone anyway
                logger.debug(
                    "closing the connection to %s failed", self._remote_key.short, exc_info=True
                )
        if scope.cancelled_caught:
            logger.warning("closing the connection to %s timed out", self._remote_key.short)
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<WebRTCLink {self._local_key.short}->{self._remote_key.short} {state}>"


def _no_signaler(remote_key: PublicKey) -> ConnectError:
    error = ConnectError(f"cannot signal {remote_key.short}: no signaler attached")
    error.__cause__ = RuntimeError("no signaler is attached to this WebRTC transport")
    return error


class _PendingDial:
    __slots__ = ("answer", "error", "event", "remote_key")

    def __init__(self, remote_key: PublicKey) -> None:
        self.remote_key = remote_key
        self.answer: _Signal | None = None
        self.error: BaseException | None = None
        self.event = anyio.Event()

    async def wait(self) -> _Signal:
        await self.event.wait()
        if self.answer is None:
            raise ConnectError(f"dial to {self.remote_key.short} abandoned") from self.error
        return self.answer


class WebRTCTransport(Transport):
    """Dials and serves links over WebRTC data channels, signalled through a `Signaler`.

    Args:
        ice_servers: STUN and TURN servers: URLs (``"stun:host:3478"``,
            ``"turn:host:3478?transport=tcp"``), `IceServer` or aiortc ``RTCIceServer``
            values. None given: host candidates only (no STUN/TURN).
        signaler: carries signals to other nodes; settable later as `signaler`.
        config: limits and timeouts (`WebRTCConfig` defaults when None).

    Raises:
        ValueError: if an ICE server URL is malformed.
    """

    scheme: ClassVar[str] = _SCHEME

    def __init__(
        self,
        ice_servers: Sequence[str | IceServer | RTCIceServer] = (),
        *,
        signaler: Signaler | None = None,
        config: WebRTCConfig | None = None,
    ) -> None:
        self.signaler: Signaler | None = signaler
        """Carries this transport's offers and answers; attach one before dialling."""
        self._config = WebRTCConfig() if config is None else config
        self._ice_servers: list[RTCIceServer] = []
        for server in ice_servers:
            if isinstance(server, str):
                server = IceServer(server)
            elif isinstance(server, RTCIceServer):  # checked as IceServer checks its own
                urls = server.urls
                IceServer(urls if isinstance(urls, str) else tuple(urls))
            self._ice_servers.append(
                server if isinstance(server, RTCIceServer) else server.to_aiortc()
            )
        self._serving: tuple[PublicKey, TaskGroup, LinkHandler] | None = None
        self._dials: dict[str, _PendingDial] = {}
        self._answering: set[tuple[PublicKey, str]] = set()
        self._accepted: set[WebRTCLink] = set()
        self._peer_connections = 0
        self._signals_dropped = 0

    @property
    def config(self) -> WebRTCConfig:
        """This transport's limits and timeouts."""
        return self._config

    @property
    def local_key(self) -> PublicKey | None:
        """The key this transport serves under, or None when it is not serving."""
        return None if self._serving is None else self._serving[0]

    @property
    def addresses(self) -> list[str]:
        """``["webrtc://<key>"]`` while serving, else empty."""
        return [] if self._serving is None else [_address(self._serving[0])]

    def can_dial(self, address: str | None) -> bool:
        """True for ``"webrtc://..."`` addresses, and for None while a signaler is attached."""
        if address is None:
            return self.signaler is not None
        return isinstance(address, str) and address.startswith(_PREFIX)

    def statistics(self) -> WebRTCStatistics:
        """This transport's counters."""
        return WebRTCStatistics(
            peer_connections=self._peer_connections,
            pending_dials=len(self._dials),
            pending_answers=len(self._answering),
            accepted_links=len(self._accepted),
            signals_dropped=self._signals_dropped,
        )

    async def serve(
        self,
        local_key: PublicKey,
        handler: LinkHandler,
        *,
        task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer offers under ``local_key`` until cancelled; see `Transport.serve`.

        Reports ``["webrtc://<local_key>"]``. On exit, dials in progress fail, and every
        answer in progress and every link it accepted is closed abortively.

        Raises:
            RuntimeError: if this transport is already serving.
        """
        if self._serving is not None:
            raise RuntimeError("this transport is already serving")
        async with anyio.create_task_group() as task_group:
            self._serving = (local_key, task_group, handler)
            try:
                task_status.started([_address(local_key)])
                await anyio.sleep_forever()
            finally:
                self._serving = None
                for pending in self._dials.values():
                    pending.error = ConnectionAbortedError("the transport stopped serving")
                    pending.event.set()
                task_group.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    for link in list(self._accepted):
                        await link._close(abort=True)

    def receive_signal(self, sender: PublicKey, payload: bytes) -> None:
        """Take a signal that node ``sender``'s transport sent us; never blocks.

        ``sender`` must be authenticated by whoever calls this. Malformed payloads,
        answers to no dial of ours (or from another node), duplicate offers and offers
        beyond ``max_pending_answers`` are logged and dropped.
        """
        try:
            signal = _decode_signal(payload)
        except ValueError as exc:
            self._signals_dropped += 1
            logger.warning("dropping a malformed signal from %s: %s", sender.short, exc)
            return
        reason = self._route_signal(sender, signal)
        if reason is not None:
            self._signals_dropped += 1
            logger.debug(
                "dropping %s %s from %s: %s", signal.kind, signal.dial_id, sender.short, reason
            )

    def _route_signal(self, sender: PublicKey, signal: _Signal) -> str | None:
        if self._serving is None:
            return "not serving"
        local_key, task_group, handler = self._serving
        if signal.kind == "answer":
            pending = self._dials.get(signal.dial_id)
            if pending is None or pending.remote_key != sender or pending.answer is not None:
                return "no such dial (expired, answered, or to another node)"
            pending.answer = signal
            pending.event.set()
            return None
        attempt = (sender, signal.dial_id)
        if attempt in self._answering:
            return "already answering it"
        if len(self._answering) >= self._config.max_pending_answers:
            logger.warning(
                "dropping an offer from %s: %d answers pending", sender.short, len(self._answering)
            )
            return "too many answers pending"
        self._answering.add(attempt)
        task_group.start_soon(
            self._answer, local_key, sender, signal, handler, name=f"webrtc answer {sender.short}"
        )
        return None

    def _new_link(self, local_key: PublicKey, remote_key: PublicKey) -> WebRTCLink:
        policy = (
            RTCIceTransportPolicy.RELAY if self._config.relay_only else RTCIceTransportPolicy.ALL
        )
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=list(self._ice_servers), iceTransportPolicy=policy)
        )
        self._peer_connections += 1
        return WebRTCLink(
            pc,
            local_key=local_key,
            remote_key=remote_key,
            config=self._config,
            on_close=self._forget,
        )

    def _forget(self, link: WebRTCLink) -> None:
        self._peer_connections -= 1
        self._accepted.discard(link)

    async def _send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
        signaler = self.signaler
        if signaler is None:
            raise _no_signaler(remote_key)
        try:
            await signaler.send_signal(remote_key, payload)
        except Exception as exc:
            raise ConnectError(f"cannot signal {remote_key.short}: {exc}") from exc

    async def dial(self, remote_key: PublicKey, address: str | None = None) -> WebRTCLink:
        """Open a link to ``remote_key`` through the signaler (``address``, if given, names it).

        Sends an offer, waits for the answer, then for ICE, DTLS and SCTP to come up,
        all within ``connect_timeout``.

        Raises:
            crdtswarm.errors.ConnectError: if there is no signaler or it fails, no answer
                comes in time, ICE or DTLS fail (a tampered fingerprint, for one), or
                `serve` stops meanwhile.
            ValueError: if ``address`` is not ``"webrtc://<remote_key>"``.
            RuntimeError: if this transport is not serving.
        """
        if address is not None and _parse_address(address) != remote_key:
            raise ValueError(f"{address} is not the address of {remote_key.short}")
        if self._serving is None:
            raise RuntimeError("serve() must have started before dial()")
        if self.signaler is None:
            raise _no_signaler(remote_key)
        dial_id = secrets.token_hex(8)
        pending = self._dials[dial_id] = _PendingDial(remote_key)
        link = self._new_link(self._serving[0], remote_key)
        pc = link._pc

        async def offer() -> None:
            await pc.setLocalDescription(await pc.createOffer())
            sdp = pc.localDescription.sdp
            await self._send_signal(remote_key, _encode_signal("offer", dial_id, sdp, self._config))
            answer = await pending.wait()
            link._set_limits(answer.max_message_size, answer.window)
            await pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))

        try:
            await self._establish(link, offer)
        finally:
            del self._dials[dial_id]
        return link

    async def _answer(
        self, local_key: PublicKey, remote_key: PublicKey, offer: _Signal, handler: LinkHandler
    ) -> None:
        link = self._new_link(local_key, remote_key)
        pc = link._pc
        link._set_limits(offer.max_message_size, offer.window)

        async def answer() -> None:
            await pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            sdp = pc.localDescription.sdp
            await self._send_signal(
                remote_key, _encode_signal("answer", offer.dial_id, sdp, self._config)
            )

        try:
            await self._establish(link, answer)
        except ConnectError as exc:
            logger.debug("answering %s failed: %s", remote_key.short, exc)
            return
        finally:
            self._answering.discard((remote_key, offer.dial_id))
        self._accepted.add(link)
        try:
            await handler(link)
        except Exception:
            logger.exception("link handler failed on %r", link)
            await anyio.aclose_forcefully(link)

    async def _establish(self, link: WebRTCLink, negotiate: Callable[[], Awaitable[None]]) -> None:
        """Negotiate, then wait for the channel, in ``connect_timeout``; else close ``link``."""
        key, timeout = link.remote_key.short, self._config.connect_timeout
        try:
            with anyio.fail_after(timeout):
                await negotiate()
                await link._wait_open()
        except BaseException as exc:
            await link._close(abort=True)
            if isinstance(exc, TimeoutError):
                raise ConnectError(f"connecting with {key} timed out after {timeout} s") from exc
            if isinstance(exc, ConnectError) or not isinstance(exc, Exception):
                raise
            raise ConnectError(f"cannot connect to {key}: {exc}") from exc  # aiortc: bad SDP
        local, remote = link.candidate_types
        logger.debug("link with %s up (%s/%s candidates)", key, local, remote)
