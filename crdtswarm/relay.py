"""Relayed circuits: the relay service, and `RelayTransport`, whose links cross relays.

Drivers of `crdtswarm.protocol.relay` (read its docstring for the wire protocol).
`RelayService` serves the relay substreams a node's peers open to it: a CONNECT makes
it relay (or refuse), an INCOMING hands a new circuit to the node's `RelayTransport`,
which gives it to the swarm as a `Link`. `RelayTransport.dial` builds a circuit
through one or two relays (``relay://<relay>[/<relay2>]/<target>``) and returns its
`Link`. The swarm then runs its Noise handshake over that link end to end.

Rules:

1. Ciphertext only. A relay copies the bytes of two substreams and never looks at
   them: the two ends authenticate each other and encrypt over the circuit, so a
   relay can neither read nor alter what they say, nor pass itself off as either.
2. Direct hops only. A relay forwards a request only to a node it has a *direct*
   link to (the injected `StreamOpener` refuses relayed ones), and only a request
   that itself came over a direct link; with the protocol's bound this keeps every
   circuit to at most two relays and free of loops.
3. Bounded. A relay holds at most ``max_buffer_size`` bytes per direction of a
   circuit: it reads that much, and reads again only once the piece was accepted by
   the other substream (whose mux credit bounds what is in flight beyond it).
   Circuits are limited in number (in total and per asking peer), bytes, rate and
   idle time (`RelayConfig`).
4. Fate sharing. A clean end (EOF) of one side is passed on as EOF; when both
   directions have ended the circuit is done. Anything else (a reset, a broken link,
   a limit, the idle timer) resets both substreams at once, with the peer's code
   for a reset, ``CANCELLED`` for a broken link, ``TIMEOUT`` when idle, ``REFUSED``
   at the byte limit. A `RelayLink` whose circuit dies raises
   ``anyio.BrokenResourceError`` (``__cause__`` says why).
5. Frames. A `RelayLink` carries messages as length-prefixed frames
   (`crdtswarm.transport.framing`) over the circuit's bytes, at most
   ``max_message_size`` each (both ends must agree, as for TCP). A send cancelled
   half-way through a frame breaks the link (a torn frame cannot be taken back).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

import anyio
from anyio.lowlevel import checkpoint, checkpoint_if_cancelled

from crdtswarm.errors import (
    ConnectError,
    ErrorCode,
    FrameError,
    RelayError,
    StreamResetError,
)
from crdtswarm.identity import InvalidKeyError, PublicKey
from crdtswarm.log import ContextLogger
from crdtswarm.protocol.relay import (
    PROTOCOL,
    CircuitAccepted,
    CircuitRefused,
    CircuitSession,
    ConnectRequested,
    DataReceived,
    IncomingAnnounced,
    RefusalReason,
    RelayEvent,
    TokenBucket,
)
from crdtswarm.transport.abc import Link, LinkAttribute, LinkHandler, Transport, check_message_size
from crdtswarm.transport.framing import FrameDecoder, encode_frame

if TYPE_CHECKING:
    from anyio import TypedAttributeProvider
    from anyio.abc import TaskGroup, TaskStatus

    from crdtswarm.mux import MuxStream

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "PROTOCOL",
    "SCHEME",
    "RelayConfig",
    "RelayLink",
    "RelayRefusedError",
    "RelayService",
    "RelayStatistics",
    "RelayTransport",
    "StreamOpener",
    "fallback_relays",
    "is_relayed",
    "parse_relay_address",
    "relay_address",
]

logger = logging.getLogger(__name__)

SCHEME: Final = "relay"
"""The address scheme of relayed links: ``relay://<relay>[/<relay2>]/<target>``."""
DEFAULT_MAX_MESSAGE_SIZE: Final = (1 << 20) + 64
"""The largest message on a relayed link by default: TCP's, 1 MiB plus room for headers."""

_PREFIX: Final = f"{SCHEME}://"

StreamOpener = Callable[[PublicKey], Awaitable["MuxStream"]]
"""``await open(key)``: a new relay substream (`PROTOCOL`) on our *direct* link to ``key``.

Raises `crdtswarm.errors.ConnectError` when there is no direct link to ``key``.
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayConfig:
    """What a node does as a relay for others; every field has a sensible default."""

    enabled: bool = True
    """Relay for peers that ask (default True); False refuses every circuit (DISABLED)."""
    max_circuits: int = 64
    """Circuits this node relays at once, in total (default 64)."""
    max_circuits_per_peer: int = 8
    """Circuits one asking peer may have through this node at once (default 8)."""
    max_circuit_bytes: int | None = 1 << 30
    """Bytes one circuit may carry, both directions together, before it is reset
    with ``REFUSED`` (default 1 GiB); None: no limit."""
    max_circuit_rate: float | None = float(1 << 20)
    """Average bytes per second one circuit may carry, both directions together
    (token bucket; default 1 MiB/s); None: no limit."""
    rate_burst_size: int = 256 * 1024
    """Bytes a circuit may send at once above ``max_circuit_rate`` (the bucket's size;
    default 256 KiB)."""
    max_buffer_size: int = 64 * 1024
    """Bytes the relay holds per direction of a circuit: the size of each read
    (default 64 KiB)."""
    idle_timeout: float = 30.0
    """Seconds without a byte in either direction after which a circuit is reset
    with ``TIMEOUT`` (default 30; swarm links send a keepalive every 5 s)."""
    connect_timeout: float = 10.0
    """Seconds a relay waits for a request on a new substream, and for the next
    hop's answer (default 10)."""

    def __post_init__(self) -> None:
        if self.max_circuits < 0 or self.max_circuits_per_peer < 0:
            raise ValueError("circuit limits must be >= 0")
        if self.max_circuit_bytes is not None and self.max_circuit_bytes < 0:
            raise ValueError("max_circuit_bytes must be >= 0 or None")
        if self.max_circuit_rate is not None and not self.max_circuit_rate > 0:
            raise ValueError("max_circuit_rate must be > 0 or None")
        if self.rate_burst_size <= 0 or self.max_buffer_size <= 0:
            raise ValueError("rate_burst_size and max_buffer_size must be > 0")
        if not (self.idle_timeout > 0 and self.connect_timeout > 0):
            raise ValueError("idle_timeout and connect_timeout must be > 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayStatistics:
    """Counters of a `RelayService` since it started."""

    circuits: int
    """Circuits being relayed now (including those still waiting for the next hop)."""
    circuits_opened: int
    """Circuits that were accepted end to end."""
    circuits_refused: int
    """Requests answered with REFUSED."""
    bytes_relayed: int
    """Circuit bytes forwarded, both directions together."""


class RelayRefusedError(RelayError):
    """Raised (as ``__cause__`` of `crdtswarm.errors.ConnectError`) when a relay refused a circuit.

    Attributes:
        reason: a `crdtswarm.protocol.relay.RefusalReason` (or the raw code when unknown).
        message: the relay's explanation.
        relay: the relay we asked (a refusal further on is passed back by it).
    """

    def __init__(self, reason: RefusalReason | int, message: str, *, relay: PublicKey) -> None:
        name = reason.name if isinstance(reason, RefusalReason) else str(reason)
        super().__init__(f"relay {relay.short} refused the circuit ({name}): {message}")
        self.reason = reason
        self.message = message
        self.relay = relay


# -- addresses -------------------------------------------------------------------------


def relay_address(relays: Sequence[PublicKey], target: PublicKey) -> str:
    """The address of ``target`` through ``relays``: ``relay://<r1>[/<r2>]/<target>``.

    Raises:
        ValueError: if there are not 1 or 2 relays, or a node appears twice.
    """
    if not 1 <= len(relays) <= 2:
        raise ValueError(f"a relayed path has 1 or 2 relays, not {len(relays)}")
    path = (*relays, target)
    if len(set(path)) != len(path):
        raise ValueError("a relayed path names a node twice")
    return _PREFIX + "/".join(str(key) for key in path)


def parse_relay_address(address: str) -> tuple[tuple[PublicKey, ...], PublicKey]:
    """Read ``relay://<r1>[/<r2>]/<target>`` into (relays, target).

    Raises:
        ValueError: if ``address`` is not such an address.
    """
    if not isinstance(address, str) or not address.startswith(_PREFIX):
        raise ValueError(f"not a relay address (relay://<relay>/<target>): {address!r}")
    try:
        keys = tuple(PublicKey.parse(part) for part in address[len(_PREFIX) :].split("/"))
    except InvalidKeyError as exc:
        raise ValueError(f"bad relay address {address!r}: {exc}") from None
    relays, target = keys[:-1], keys[-1]
    relay_address(relays, target)  # checks the shape
    return relays, target


def is_relayed(resource: TypedAttributeProvider) -> bool:
    """Whether ``resource`` (a link, a secure channel or a mux stream over it) is relayed."""
    return resource.extra(LinkAttribute.transport, None) == SCHEME


def fallback_relays(
    target: PublicKey,
    peers: Mapping[PublicKey, float | None],
    rows: Mapping[PublicKey, Mapping[PublicKey, float]],
    *,
    exclude: Collection[PublicKey] = (),
    limit: int = 3,
) -> list[PublicKey]:
    """Direct peers to try as single relays to ``target``, best first.

    For when the route knows no relay (the latency rows have not arrived yet) or its
    relay failed (the rows lag behind a death). Peers whose row, or the target's,
    shows a link to ``target`` come first, by round-trip time through them; then the
    others by their own round-trip time (a peer without a link refuses at once);
    peers not measured yet come last in each group.

    Args:
        target: the node to reach.
        peers: our direct peers and their round-trip times in seconds (None: unknown).
        rows: the members' latency rows, author -> peer -> seconds.
        exclude: peers not to try (the relay the route already tried).
        limit: the most peers to return.
    """
    ranked: list[tuple[bool, float, PublicKey]] = []
    for relay, rtt in peers.items():
        if relay == target or relay in exclude:
            continue
        weight = rows.get(relay, {}).get(target, rows.get(target, {}).get(relay))
        cost = (math.inf if rtt is None else rtt) + (weight or 0.0)
        ranked.append((weight is None, cost, relay))
    return [relay for *_, relay in sorted(ranked)[:limit]]


# -- the relayed link ----------------------------------------------------------------


class RelayLink(Link):
    """One end of a circuit: framed messages over the bytes of a relay substream.

    Made by `RelayTransport` (its ``dial``, and for incoming circuits its ``serve``).
    Several tasks may send (or receive) at once; each message is delivered whole,
    or the link breaks (module rule 5).
    """

    def __init__(
        self,
        stream: MuxStream,
        *,
        local_key: PublicKey,
        remote_key: PublicKey,
        relays: tuple[PublicKey, ...],
        max_message_size: int,
        received: bytes = b"",
        on_close: Callable[[RelayLink], None] | None = None,
    ) -> None:
        self._stream = stream
        self._local_key = local_key
        self._remote_key = remote_key
        self._relays = relays
        self._max_message_size = max_message_size
        self._decoder = FrameDecoder(max_message_size)
        self._frames: collections.deque[bytes] = collections.deque()
        self._send_lock = anyio.Lock()
        self._receive_lock = anyio.Lock()
        self._closed = False
        self._closed_event = anyio.Event()
        self._eof_sent = False
        self._eof_received = False
        self._broken: BaseException | None = None
        self._on_close = on_close
        if received:
            self._feed(received)

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes, that `send` accepts and `receive` allows."""
        return self._max_message_size

    @property
    def remote_key(self) -> PublicKey:
        """The node the circuit claims to reach (proven only by the handshake above)."""
        return self._remote_key

    @property
    def relays(self) -> tuple[PublicKey, ...]:
        """The relays of the circuit, from this end to the other."""
        return self._relays

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """`LinkAttribute` values: scheme ``"relay"``, ``relay://...`` addresses.

        Each address is the path to that end from the other one, so the remote
        address is dialable from here and the local one from there.
        """
        remote = relay_address(self._relays, self._remote_key)
        local = relay_address(self._relays[::-1], self._local_key)
        return {
            LinkAttribute.transport: lambda: SCHEME,
            LinkAttribute.local_address: lambda: local,
            LinkAttribute.remote_address: lambda: remote,
        }

    async def send(self, item: bytes) -> None:
        """Send one message as one frame; waits for the circuit's flow-control credit.

        Raises:
            ValueError: if ``item`` is longer than `max_message_size` (nothing is sent).
            anyio.ClosedResourceError: if this end was closed or sent EOF.
            anyio.BrokenResourceError: if the circuit died.
        """
        await checkpoint_if_cancelled()
        self._check_send()
        size = len(item)
        check_message_size(size, self._max_message_size)
        frame = encode_frame(bytes(item))
        async with self._send_lock:
            self._check_send()
            try:
                await self._stream.send(frame)
            except (StreamResetError, anyio.BrokenResourceError) as exc:
                raise self._break(exc) from exc
            except anyio.ClosedResourceError:
                if self._closed:
                    raise
                raise self._break(anyio.ClosedResourceError()) from None
            except BaseException as exc:  # cancelled: the frame may be torn (rule 5)
                self._break(exc)
                self._stream.reset_nowait(ErrorCode.CANCELLED, "a relayed send was cancelled")
                raise

    async def receive(self) -> bytes:
        """Receive the next message.

        Raises:
            anyio.EndOfStream: the other end closed its sending side at a frame
                boundary and every message has been received.
            anyio.ClosedResourceError: this end was closed.
            anyio.BrokenResourceError: the circuit died (or ended mid-message).
            crdtswarm.errors.FrameError: the other end sent a frame above
                `max_message_size`; the circuit is reset.
        """
        await checkpoint()
        async with self._receive_lock:
            while not self._frames:
                if self._closed:
                    raise anyio.ClosedResourceError
                if self._broken is not None:
                    raise anyio.BrokenResourceError("the relayed circuit died") from self._broken
                if self._eof_received:
                    raise anyio.EndOfStream
                try:
                    chunk = await self._stream.receive()
                except anyio.EndOfStream:
                    if not self._decoder.is_at_frame_boundary:
                        cause = anyio.EndOfStream("the circuit ended in the middle of a message")
                        raise self._break(cause) from cause
                    self._eof_received = True
                    raise
                except (StreamResetError, anyio.BrokenResourceError) as exc:
                    raise self._break(exc) from exc
                except anyio.ClosedResourceError:
                    if self._closed:
                        raise
                    raise self._break(anyio.ClosedResourceError()) from None
                self._feed(chunk)
            return self._frames.popleft()

    async def send_eof(self) -> None:
        """Finish sending: the other end gets EOF after every message sent so far.

        Raises:
            anyio.ClosedResourceError: if this end was closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            await checkpoint()
            return
        self._eof_sent = True
        async with self._send_lock:
            with contextlib.suppress(StreamResetError, anyio.BrokenResourceError):
                await self._stream.send_eof()

    async def aclose(self) -> None:
        """Close this end: the other end gets every message sent so far, then EOF.

        Called in a cancelled scope (``anyio.aclose_forcefully``), the close is
        abortive: the circuit is reset and the other end gets ``BrokenResourceError``.
        """
        if not self._closed:
            self._closed = True
            if anyio.current_effective_deadline() == -math.inf:
                self._stream.reset_nowait(ErrorCode.CANCELLED, "relayed link aborted")
            else:
                await self._stream.aclose()
            self._closed_event.set()
            if self._on_close is not None:
                self._on_close(self)
        await checkpoint()

    def abort(self) -> None:
        """Close this end abortively, at once (see `aclose`)."""
        if not self._closed:
            self._closed = True
            self._stream.reset_nowait(ErrorCode.CANCELLED, "relayed link aborted")
            self._closed_event.set()
            if self._on_close is not None:
                self._on_close(self)

    async def wait_closed(self) -> None:
        """Wait until this end is closed (`aclose` or `abort`)."""
        await self._closed_event.wait()

    def __repr__(self) -> str:
        path = "/".join(k.short for k in (*self._relays, self._remote_key))
        return f"<RelayLink {self._local_key.short}->{path} {'closed' if self._closed else 'open'}>"

    # -- internals -------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            raise anyio.ClosedResourceError("this side already sent EOF")
        if self._broken is not None:
            raise anyio.BrokenResourceError("the relayed circuit died") from self._broken

    def _break(self, cause: BaseException) -> anyio.BrokenResourceError:
        if self._broken is None:
            self._broken = cause
        return anyio.BrokenResourceError(f"the relayed circuit died: {cause}")

    def _feed(self, chunk: bytes) -> None:
        try:
            self._frames.extend(self._decoder.feed(chunk))
        except FrameError as exc:
            self._broken = exc
            self._stream.reset_nowait(exc.code, "relayed frame too large")
            self._frames.extend(self._decoder.frames_before_error)
            if not self._frames:
                raise
            # the frames before the bad header are delivered first; then the link is broken


# -- reading control messages ----------------------------------------------------------


async def _next_event(stream: MuxStream, session: CircuitSession) -> RelayEvent:
    """The session's next event, reading the stream as needed.

    Raises:
        FrameError: malformed input.
        anyio.EndOfStream: the stream ended first.
        StreamResetError | anyio.BrokenResourceError: the stream or its link died.
    """
    while (event := session.next_event()) is None:
        session.receive_data(await stream.receive())
    return event


def _opaque_rest(session: CircuitSession) -> bytes:
    """The circuit bytes that arrived with the answer (rule 2 of the protocol)."""
    parts: list[bytes] = []
    while (event := session.next_event()) is not None:
        if isinstance(event, DataReceived):
            parts.append(event.data)
    return b"".join(parts)


class _Refusal(Exception):
    def __init__(self, reason: RefusalReason | int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


_HOP_ERRORS = (
    TimeoutError,
    FrameError,
    anyio.EndOfStream,
    StreamResetError,
    anyio.BrokenResourceError,
)
"""How a hop can fail to answer a request (see `_request`)."""


async def _request(stream: MuxStream, session: CircuitSession, timeout: float) -> bytes:
    """Send the session's request and wait for the answer; return the bytes after OK.

    On any failure the stream is reset (or closed after a refusal).

    Raises:
        _Refusal: the hop answered REFUSED.
        TimeoutError: no answer within ``timeout`` seconds.
        FrameError: the hop's answer was malformed.
        anyio.EndOfStream | StreamResetError | anyio.BrokenResourceError: the
            substream or the link under it ended first.
    """
    try:
        with anyio.fail_after(timeout):
            await stream.send(session.data_to_send())
            answer = await _next_event(stream, session)
    except TimeoutError:
        stream.reset_nowait(ErrorCode.TIMEOUT, "no answer to the relay request")
        raise
    except FrameError as exc:
        stream.reset_nowait(exc.code, str(exc)[:200])
        raise
    except BaseException:
        stream.reset_nowait(ErrorCode.CANCELLED, "relay request abandoned")
        raise
    if isinstance(answer, CircuitRefused):
        await stream.aclose()
        raise _Refusal(answer.reason, answer.message)
    assert isinstance(answer, CircuitAccepted)  # the session allows nothing else
    return _opaque_rest(session)


async def _answer(stream: MuxStream, session: CircuitSession) -> None:
    with contextlib.suppress(
        StreamResetError, anyio.BrokenResourceError, anyio.ClosedResourceError
    ):
        await stream.send(session.data_to_send())


# -- the relay service -------------------------------------------------------------------


@dataclass(slots=True)
class _Circuit:
    source: PublicKey
    bucket: TokenBucket | None
    bytes: int = 0
    last_activity: float = 0.0


class _CircuitEnded(Exception):
    def __init__(self, code: ErrorCode | int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RelayService:
    """Serves the relay substreams that peers open to this node (module rules 1 to 4).

    Args:
        local_key: this node's key.
        open_stream: opens a relay substream on a direct link (see `StreamOpener`).
        transport: the node's `RelayTransport`, which takes incoming circuits; None
            refuses them (NOT_ACCEPTING).
        config: limits, see `RelayConfig`.
    """

    def __init__(
        self,
        local_key: PublicKey,
        *,
        open_stream: StreamOpener,
        transport: RelayTransport | None = None,
        config: RelayConfig | None = None,
    ) -> None:
        self._local_key = local_key
        self._open_stream = open_stream
        self._transport = transport
        self._config = config or RelayConfig()
        self._per_peer: collections.Counter[PublicKey] = collections.Counter()
        self._circuits = 0
        self._opened = 0
        self._refused = 0
        self._bytes = 0
        self._log = ContextLogger(logger, local_key.short)

    @property
    def config(self) -> RelayConfig:
        """The relay's limits."""
        return self._config

    def statistics(self) -> RelayStatistics:
        """A snapshot of the counters."""
        return RelayStatistics(
            circuits=self._circuits,
            circuits_opened=self._opened,
            circuits_refused=self._refused,
            bytes_relayed=self._bytes,
        )

    async def handle_stream(self, stream: MuxStream, remote_key: PublicKey) -> None:
        """Serve one relay substream that the direct peer ``remote_key`` opened.

        Returns when the circuit (or the refusal) is over; the caller then closes
        the stream. Suitable as the mux handler of `PROTOCOL`.
        """
        session = CircuitSession(is_opener=False)
        try:
            with anyio.fail_after(self._config.connect_timeout):
                request = await _next_event(stream, session)
        except TimeoutError:
            stream.reset_nowait(ErrorCode.TIMEOUT, "no relay request")
            return
        except FrameError as exc:
            self._log.info("bad relay request from %s: %s", remote_key.short, exc)
            stream.reset_nowait(exc.code, str(exc)[:200])
            return
        except (anyio.EndOfStream, StreamResetError, anyio.BrokenResourceError):
            return  # the asking side gave up first
        if is_relayed(stream):
            self._refused += 1
            session.refuse(RefusalReason.BAD_PATH, "no relaying over a relayed link")
            await _answer(stream, session)
            return
        if isinstance(request, IncomingAnnounced):
            if self._transport is None:
                session.refuse(RefusalReason.NOT_ACCEPTING, "this node takes no relayed links")
                await _answer(stream, session)
                return
            await self._transport._take_incoming(stream, session, request, remote_key)
        elif isinstance(request, ConnectRequested):
            await self._relay(stream, session, request, remote_key)

    async def _relay(
        self,
        upstream: MuxStream,
        session: CircuitSession,
        request: ConnectRequested,
        sender: PublicKey,
    ) -> None:
        config = self._config
        refusal = self._check(request, sender)
        if refusal is not None:
            self._refused += 1
            self._log.debug("refusing a circuit for %s: %s", sender.short, refusal.message)
            session.refuse(refusal.reason, refusal.message)
            await _answer(upstream, session)
            return
        now = anyio.current_time()
        rate = config.max_circuit_rate
        circuit = _Circuit(
            source=sender,
            bucket=TokenBucket(rate, config.rate_burst_size, now) if rate is not None else None,
            last_activity=now,
        )
        self._circuits += 1
        self._per_peer[sender] += 1
        downstream: MuxStream | None = None
        piped = False
        try:
            try:
                downstream, rest = await self._connect_onward(request, sender)
            except _Refusal as exc:
                self._refused += 1
                session.refuse(exc.reason, exc.message)
                await _answer(upstream, session)
                return
            session.accept()
            try:
                await upstream.send(session.data_to_send())
            except (StreamResetError, anyio.BrokenResourceError):
                return  # the source went away meanwhile
            self._opened += 1
            self._log.debug(
                "relaying %s -> %s", sender.short, (request.via or (request.target,))[0].short
            )
            await self._pipe(circuit, upstream, downstream, rest)
            piped = True
        finally:
            self._circuits -= 1
            self._per_peer[sender] -= 1
            if self._per_peer[sender] <= 0:
                del self._per_peer[sender]
            if downstream is not None and not piped:  # cancelled or failed on the way
                downstream.reset_nowait(ErrorCode.CANCELLED, "the relay ended the circuit")

    def _check(self, request: ConnectRequested, sender: PublicKey) -> _Refusal | None:
        if not self._config.enabled:
            return _Refusal(RefusalReason.DISABLED, "relaying is disabled on this node")
        path = (*request.origin, sender, self._local_key, *request.via, request.target)
        if len(set(path)) != len(path):
            return _Refusal(RefusalReason.BAD_PATH, "the path visits a node twice")
        if self._circuits >= self._config.max_circuits:
            return _Refusal(RefusalReason.LIMIT, f"relay full ({self._circuits} circuits)")
        if self._per_peer[sender] >= self._config.max_circuits_per_peer:
            return _Refusal(
                RefusalReason.LIMIT, f"too many circuits for {sender.short} through this relay"
            )
        return None

    async def _connect_onward(
        self, request: ConnectRequested, sender: PublicKey
    ) -> tuple[MuxStream, bytes]:
        hop = request.via[0] if request.via else request.target
        try:
            stream = await self._open_stream(hop)
        except (ConnectError, anyio.BrokenResourceError) as exc:
            raise _Refusal(
                RefusalReason.NOT_LINKED, f"{hop.short} is not linked to {self._local_key.short}"
            ) from exc
        session = CircuitSession(is_opener=True)
        origin = (*request.origin, sender)
        if request.via:
            session.send_connect(request.target, via=request.via[1:], origin=origin)
        else:
            session.send_incoming(origin)
        try:
            rest = await _request(stream, session, self._config.connect_timeout)
        except _HOP_ERRORS as exc:
            text = str(exc) or type(exc).__name__
            raise _Refusal(RefusalReason.UNREACHABLE, f"{hop.short}: {text}") from exc
        except _Refusal as exc:
            raise _Refusal(exc.reason, f"{hop.short}: {exc.message}") from None
        return stream, rest

    async def _pipe(
        self, circuit: _Circuit, upstream: MuxStream, downstream: MuxStream, rest: bytes
    ) -> None:
        outcome: list[_CircuitEnded] = []
        finished = 0

        async def run(source: MuxStream, sink: MuxStream, first: bytes) -> None:
            nonlocal finished
            try:
                if first:
                    await self._forward(circuit, sink, first)
                while True:
                    try:
                        data = await source.receive(self._config.max_buffer_size)
                    except anyio.EndOfStream:
                        await sink.send_eof()
                        break
                    await self._forward(circuit, sink, data)
            except _CircuitEnded as exc:
                end(exc)
            except StreamResetError as exc:
                end(_CircuitEnded(exc.code, exc.message or "reset by the other side"))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                end(_CircuitEnded(ErrorCode.CANCELLED, "the other side's link broke"))
            else:
                finished += 1
                if finished == 2:
                    tg.cancel_scope.cancel()

        def end(reason: _CircuitEnded) -> None:
            if not outcome:
                outcome.append(reason)
            tg.cancel_scope.cancel()

        async def watch_idle() -> None:
            idle = self._config.idle_timeout
            while True:
                await anyio.sleep_until(circuit.last_activity + idle)
                if anyio.current_time() >= circuit.last_activity + idle:
                    end(_CircuitEnded(ErrorCode.TIMEOUT, f"relay: circuit idle for {idle:g} s"))
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, upstream, downstream, b"")
            tg.start_soon(run, downstream, upstream, rest)
            tg.start_soon(watch_idle)
        if outcome:
            code, message = outcome[0].code, outcome[0].message
            self._log.debug("circuit of %s ended: %s", circuit.source.short, message)
            upstream.reset_nowait(code, message)
            downstream.reset_nowait(code, message)
        else:
            await downstream.aclose()

    async def _forward(self, circuit: _Circuit, sink: MuxStream, data: bytes) -> None:
        size = len(data)
        circuit.last_activity = now = anyio.current_time()
        circuit.bytes += size
        limit = self._config.max_circuit_bytes
        if limit is not None and circuit.bytes > limit:
            raise _CircuitEnded(ErrorCode.REFUSED, f"relay: circuit byte limit ({limit}) reached")
        if circuit.bucket is not None:
            delay = circuit.bucket.reserve(size, now)
            if delay > 0:
                await anyio.sleep(delay)
        await sink.send(data)
        circuit.last_activity = anyio.current_time()
        self._bytes += size


# -- the transport -----------------------------------------------------------------------


class RelayTransport(Transport):
    """Links through relays: dials ``relay://<relay>[/<relay2>]/<target>`` addresses.

    The first relay must be a direct peer of this node: the transport reaches it
    through ``opener`` (the swarm sets it). Incoming circuits arrive through the
    node's `RelayService`, which hands them to `serve`'s handler as `RelayLink`s.
    `serve` reports no addresses: a node is reached through relays by key.

    Args:
        opener: opens relay substreams on direct links (see `StreamOpener`); may be
            set later through the ``opener`` attribute, before `dial`.
        connect_timeout: seconds a dial waits for the circuit to be accepted (10).
        max_message_size: the largest message on its links, in bytes (TCP's by
            default); both ends must use the same.
    """

    scheme: ClassVar[str] = SCHEME

    def __init__(
        self,
        opener: StreamOpener | None = None,
        *,
        connect_timeout: float = 10.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, not {max_message_size}")
        self.opener = opener
        self._connect_timeout = connect_timeout
        self._max_message_size = max_message_size
        self._local_key: PublicKey | None = None
        self._handler: LinkHandler | None = None
        self._task_group: TaskGroup | None = None
        self._accepted: set[RelayLink] = set()

    @property
    def local_key(self) -> PublicKey | None:
        """The key this transport serves under, or None when it is not serving."""
        return self._local_key

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes, on this transport's links."""
        return self._max_message_size

    async def serve(
        self,
        local_key: PublicKey,
        handler: LinkHandler,
        *,
        task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand incoming circuits to ``handler`` until cancelled; see `Transport.serve`.

        On exit every incoming link still open is closed abortively.

        Raises:
            RuntimeError: if this transport is already serving.
        """
        if self._local_key is not None:
            raise RuntimeError("this transport is already serving")
        try:
            async with anyio.create_task_group() as tg:
                self._local_key, self._handler, self._task_group = local_key, handler, tg
                try:
                    task_status.started([])
                    await anyio.sleep_forever()
                finally:
                    self._task_group = self._handler = None
                    for link in list(self._accepted):
                        link.abort()
                    tg.cancel_scope.cancel()
        finally:
            self._local_key = None

    async def dial(self, remote_key: PublicKey, address: str | None = None) -> RelayLink:
        """Build a circuit to ``remote_key`` through the relays ``address`` names.

        Raises:
            crdtswarm.errors.ConnectError: the first relay is not a direct peer, a
                relay refused (``__cause__`` is a `RelayRefusedError`), no answer
                came within ``connect_timeout``, or a relay's link broke.
            ValueError: ``address`` is missing, not a relay address, does not end
                with ``remote_key``, or passes through this node.
            RuntimeError: `serve` has not started, or no ``opener`` is set.
        """
        if address is None:
            raise ValueError("a relayed dial needs an address: relay://<relay>/<target>")
        relays, target = parse_relay_address(address)
        if target != remote_key:
            raise ValueError(f"{address!r} does not lead to {remote_key.short}")
        local_key = self._local_key
        if local_key is None or self.opener is None:
            raise RuntimeError("serve() must have started, with an opener, before dial()")
        if local_key in (*relays, target):
            raise ValueError(f"{address!r} passes through this node")
        first = relays[0]
        try:
            stream = await self.opener(first)
        except (ConnectError, anyio.BrokenResourceError) as exc:
            raise ConnectError(f"no direct link to the relay {first.short}") from exc
        session = CircuitSession(is_opener=True)
        session.send_connect(target, via=relays[1:])
        try:
            rest = await _request(stream, session, self._connect_timeout)
        except _Refusal as exc:
            cause = RelayRefusedError(exc.reason, exc.message, relay=first)
            raise ConnectError(f"cannot reach {target.short}: {cause}") from cause
        except _HOP_ERRORS as exc:
            text = str(exc) or type(exc).__name__
            raise ConnectError(f"no answer from the relay {first.short}: {text}") from exc
        try:
            return RelayLink(
                stream,
                local_key=local_key,
                remote_key=target,
                relays=relays,
                max_message_size=self._max_message_size,
                received=rest,
            )
        except FrameError as exc:  # what came with the OK announced an oversized frame
            raise ConnectError(f"bad data from {target.short} through the relays") from exc

    async def _take_incoming(
        self,
        stream: MuxStream,
        session: CircuitSession,
        request: IncomingAnnounced,
        sender: PublicKey,
    ) -> None:
        """Accept an announced circuit and run it as a link until it is closed."""
        handler, tg, local_key = self._handler, self._task_group, self._local_key
        if handler is None or tg is None or local_key is None:
            session.refuse(RefusalReason.NOT_ACCEPTING, "not accepting relayed links")
            await _answer(stream, session)
            return
        path = (*request.origin, sender, local_key)
        if len(set(path)) != len(path):
            session.refuse(RefusalReason.BAD_PATH, "the path visits a node twice")
            await _answer(stream, session)
            return
        session.accept()
        try:
            await stream.send(session.data_to_send())
        except (StreamResetError, anyio.BrokenResourceError):
            return
        origin = request.origin
        link = RelayLink(
            stream,
            local_key=local_key,
            remote_key=origin[0],
            relays=(sender, *reversed(origin[1:])),
            max_message_size=self._max_message_size,
            on_close=self._accepted.discard,
        )
        self._accepted.add(link)
        tg.start_soon(self._run_handler, handler, link, name=f"relayed link {link!r}")
        try:
            await link.wait_closed()  # the substream lives as long as the link
        finally:
            link.abort()  # no-op once closed; on cancellation the circuit goes too

    @staticmethod
    async def _run_handler(handler: LinkHandler, link: RelayLink) -> None:
        try:
            await handler(link)
        except Exception:
            logger.exception("link handler failed on %r", link)
            link.abort()
