"""Sans-IO relay circuit protocol, spoken on one mux substream (``"crdtswarm/relay/1"``).

A circuit joins a *source* S to a *target* T through one or two relays. Each hop is
one substream of a direct link; the node that opens the substream (the *opener*)
sends one request, the other side (the *acceptor*) answers it once:

```
S --CONNECT(target=T)--> R --INCOMING(origin=(S,))--> T         one relay
T --OK--> R --OK--> S, then opaque bytes both ways

S --CONNECT(T, via=(R2,))--> R1 --CONNECT(T, origin=(S,))--> R2 --INCOMING((S, R1))--> T
```

After OK the substream carries opaque bytes: the two ends run their own Noise
handshake over them, so relays see ciphertext only. A relay answers its source only
after the next hop answered it, so OK means the whole circuit is up.

Wire format: each control message is a uvarint length (1 to `MAX_MESSAGE_SIZE`)
followed by the body; keys are raw 32-byte Ed25519 public keys::

```
CONNECT   0x01 | target key | via count u8 | via keys | origin count u8 | origin keys
INCOMING  0x02 | origin count u8 (1..MAX_RELAYS) | origin keys
OK        0x03
REFUSED   0x04 | reason u8 | message var_string (<= MAX_REASON_SIZE bytes)
```

``via`` are the relays still to cross after the receiver; ``origin`` are the nodes
before the *sender* of the message, source first (the receiver knows the sender: it
is the peer at the other end of the substream). So a relay getting CONNECT from X
serves the path ``origin + (X, self) + via + (target,)``, and a target getting
INCOMING from X was called by ``origin[0]`` through ``origin[1:] + (X,)``. The
origin is a claim of the previous hops, for addresses and logs only: identities are
proven by the end-to-end handshake, never by this protocol.

Rules:

1. Bounds. A control message is at most `MAX_MESSAGE_SIZE` bytes; a circuit has at
   most `MAX_RELAYS` relays (CONNECT: ``len(via) + len(origin) <= MAX_RELAYS - 1``;
   INCOMING: ``1 <= len(origin) <= MAX_RELAYS``); no key appears twice in a
   message. Before the circuit is open the session buffers at most one message.
2. One request, one answer. The opener sends exactly one request and receives
   exactly one answer; the acceptor receives one request and sends one answer.
   Nothing else may be sent before the answer: data from the opener before OK, or
   anything after REFUSED, is a protocol error. After OK every byte, in either
   direction, is opaque (`DataReceived`), including bytes that arrived in the same
   chunk as the OK.
3. Failure is terminal. Malformed input raises `crdtswarm.errors.FrameError` and
   leaves the session in `CircuitState.FAILED`, where every further input raises
   the same error. Local calls in the wrong state raise
   `crdtswarm.errors.LocalProtocolError` and change nothing.

`TokenBucket` is the sans-IO rate limiter the relay uses for each circuit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from crdtswarm.errors import FrameError, LocalProtocolError
from crdtswarm.identity import KEY_SIZE, PublicKey
from crdtswarm.protocol.wire import Reader, encode_uvarint, encode_var_string

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MAX_REASON_SIZE",
    "MAX_RELAYS",
    "PROTOCOL",
    "CircuitAccepted",
    "CircuitRefused",
    "CircuitSession",
    "CircuitState",
    "ConnectRequested",
    "DataReceived",
    "IncomingAnnounced",
    "RefusalReason",
    "RelayEvent",
    "RelayMessage",
    "TokenBucket",
    "decode_message",
    "encode_message",
]

PROTOCOL: Final = "crdtswarm/relay/1"
"""The mux protocol name of relay substreams."""
MAX_RELAYS: Final = 2
"""The most relays a circuit may cross."""
MAX_REASON_SIZE: Final = 200
"""The longest refusal message, in UTF-8 bytes."""
MAX_MESSAGE_SIZE: Final = 512
"""The largest control message body, in bytes (every valid one is far smaller)."""

_MAX_PREFIX_SIZE: Final = 2  # a uvarint of at most MAX_MESSAGE_SIZE takes two bytes


class _Type(enum.IntEnum):
    CONNECT = 1
    INCOMING = 2
    OK = 3
    REFUSED = 4


class RefusalReason(enum.IntEnum):
    """Why a circuit was refused; carried by REFUSED."""

    DISABLED = 1
    """Relaying is turned off on that node."""
    NOT_LINKED = 2
    """The next hop is not a direct peer of the relay."""
    LIMIT = 3
    """The relay has too many circuits, in total or for the asking peer."""
    BAD_PATH = 4
    """The path visits a node twice, or the request came over a relayed link."""
    UNREACHABLE = 5
    """The next hop did not answer in time, or its link broke."""
    NOT_ACCEPTING = 6
    """The target does not take relayed links now (not serving, shutting down)."""

    @classmethod
    def parse(cls, value: int) -> RefusalReason | int:
        """Return the known reason for ``value``, or ``value`` itself when it is unknown."""
        try:
            return cls(value)
        except ValueError:
            return value


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectRequested:
    """CONNECT: the sender asks the receiving relay for a circuit to ``target``."""

    target: PublicKey
    """Where the circuit ends."""
    via: tuple[PublicKey, ...] = ()
    """The relays to cross after the receiver, in order."""
    origin: tuple[PublicKey, ...] = ()
    """The nodes before the sender, source first (empty when the sender is the source)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class IncomingAnnounced:
    """INCOMING: a relay tells the target that ``origin[0]`` calls it."""

    origin: tuple[PublicKey, ...]
    """The nodes before the sending relay, source first (at least the source)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CircuitAccepted:
    """OK: the circuit is up; opaque bytes follow both ways."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CircuitRefused:
    """REFUSED: no circuit; ``reason`` (a `RefusalReason` when known) says why."""

    reason: RefusalReason | int
    message: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived:
    """Opaque circuit bytes that arrived after the circuit opened."""

    data: bytes


RelayMessage = ConnectRequested | IncomingAnnounced | CircuitAccepted | CircuitRefused
"""A control message, as `encode_message` takes it and `decode_message` returns it."""
RelayEvent = RelayMessage | DataReceived
"""What `CircuitSession.next_event` returns."""


# -- codec ------------------------------------------------------------------------------


def encode_message(message: RelayMessage) -> bytes:
    """``message`` as it goes on the substream: its length prefix, then its body.

    Raises:
        ValueError: if the message breaks rule 1 (too many relays, a repeated key,
            an out-of-range reason) or is not a `RelayMessage`.
    """
    match message:
        case ConnectRequested(target=target, via=via, origin=origin):
            if len(via) + len(origin) > MAX_RELAYS - 1:
                raise ValueError(f"a circuit crosses at most {MAX_RELAYS} relays")
            _check_distinct((target, *via, *origin))
            body = (
                bytes((_Type.CONNECT,)) + bytes(target) + _encode_keys(via) + _encode_keys(origin)
            )
        case IncomingAnnounced(origin=origin):
            if not 1 <= len(origin) <= MAX_RELAYS:
                raise ValueError(f"INCOMING names 1 to {MAX_RELAYS} origin keys")
            _check_distinct(origin)
            body = bytes((_Type.INCOMING,)) + _encode_keys(origin)
        case CircuitAccepted():
            body = bytes((_Type.OK,))
        case CircuitRefused(reason=reason, message=text):
            if not 0 <= int(reason) <= 0xFF:
                raise ValueError(f"a refusal reason is one byte, not {int(reason)}")
            raw = text.encode("utf-8")[:MAX_REASON_SIZE].decode("utf-8", "ignore")
            body = bytes((_Type.REFUSED, int(reason))) + encode_var_string(raw)
        case _:
            raise ValueError(f"not a relay message: {message!r}")
    return encode_uvarint(len(body)) + body


def decode_message(data: bytes) -> RelayMessage:
    """Decode exactly one length-prefixed message (no bytes may follow it).

    Raises:
        FrameError: if ``data`` is not exactly one valid message (rule 1).
    """
    size, start = _read_prefix(data)
    if size is None:
        raise FrameError("truncated relay message")
    if len(data) != start + size:
        raise FrameError(f"relay message of {size} bytes, got {len(data) - start}")
    return _decode_body(data[start:])


def _encode_keys(keys: tuple[PublicKey, ...]) -> bytes:
    return bytes((len(keys),)) + b"".join(bytes(key) for key in keys)


def _check_distinct(keys: tuple[PublicKey, ...]) -> None:
    if len(set(keys)) != len(keys):
        raise ValueError("a relay path names a node twice")


def _read_prefix(data: bytes | bytearray) -> tuple[int | None, int]:
    """(body size, prefix size); (None, 0) while the prefix is incomplete.

    Raises:
        FrameError: if the prefix announces an empty or too large body.
    """
    reader = Reader(bytes(data[:_MAX_PREFIX_SIZE]))
    try:
        size = reader.read_uvarint()
    except FrameError:
        if len(data) < _MAX_PREFIX_SIZE:
            return None, 0
        raise FrameError(f"relay message larger than {MAX_MESSAGE_SIZE} bytes") from None
    if not 0 < size <= MAX_MESSAGE_SIZE:
        raise FrameError(f"relay message of {size} bytes (1 to {MAX_MESSAGE_SIZE} allowed)")
    return size, reader.position


def _decode_body(body: bytes) -> RelayMessage:
    reader = Reader(body)
    kind = reader.read_u8()
    message: RelayMessage
    if kind == _Type.CONNECT:
        target = _read_key(reader)
        via = _read_keys(reader, MAX_RELAYS - 1)
        origin = _read_keys(reader, MAX_RELAYS - 1)
        if len(via) + len(origin) > MAX_RELAYS - 1:
            raise FrameError(f"CONNECT for a path of more than {MAX_RELAYS} relays")
        keys: tuple[PublicKey, ...] = (target, *via, *origin)
        message = ConnectRequested(target=target, via=via, origin=origin)
    elif kind == _Type.INCOMING:
        origin = _read_keys(reader, MAX_RELAYS)
        if not origin:
            raise FrameError("INCOMING without a source")
        keys = origin
        message = IncomingAnnounced(origin=origin)
    elif kind == _Type.OK:
        keys = ()
        message = CircuitAccepted()
    elif kind == _Type.REFUSED:
        reason = RefusalReason.parse(reader.read_u8())
        text = reader.read_var_string(MAX_REASON_SIZE)
        keys = ()
        message = CircuitRefused(reason=reason, message=text)
    else:
        raise FrameError(f"unknown relay message type {kind}")
    if not reader.at_end():
        raise FrameError(f"{reader.remaining} trailing bytes in a relay message")
    if len(set(keys)) != len(keys):
        raise FrameError("a relay message names a node twice")
    return message


def _read_key(reader: Reader) -> PublicKey:
    raw = reader.read_bytes(KEY_SIZE)
    try:
        return PublicKey(raw)
    except ValueError as exc:
        raise FrameError(f"bad public key in a relay message: {exc}") from None


def _read_keys(reader: Reader, limit: int) -> tuple[PublicKey, ...]:
    count = reader.read_u8()
    if count > limit:
        raise FrameError(f"{count} keys in a relay message field of at most {limit}")
    return tuple(_read_key(reader) for _ in range(count))


# -- session ----------------------------------------------------------------------------


class CircuitState(enum.Enum):
    """Where one hop of a circuit is; `REFUSED` and `FAILED` are terminal."""

    IDLE = "idle"
    """Nothing sent or received yet."""
    REQUESTED = "requested"
    """Opener: request sent, waiting for the answer. Acceptor: request received, not answered."""
    OPEN = "open"
    """Accepted: opaque bytes flow."""
    REFUSED = "refused"
    """Refused (by either side): the substream ends."""
    FAILED = "failed"
    """Malformed input was received (rule 3)."""


class _Input(enum.Enum):
    SEND_REQUEST = "send a request"
    SEND_OK = "send OK"
    SEND_REFUSED = "send REFUSED"
    RECV_REQUEST = "receive a request"
    RECV_OK = "receive OK"
    RECV_REFUSED = "receive REFUSED"
    RECV_DATA = "receive data"


_S = CircuitState
_I = _Input

# (is_opener, state) -> input -> next state. A missing pair is an error: LocalProtocolError
# for a SEND_* input, FrameError (and FAILED) for a RECV_* one.
_TRANSITIONS: Final[dict[tuple[bool, CircuitState], dict[_Input, CircuitState]]] = {
    (True, _S.IDLE): {_I.SEND_REQUEST: _S.REQUESTED},
    (True, _S.REQUESTED): {_I.RECV_OK: _S.OPEN, _I.RECV_REFUSED: _S.REFUSED},
    (True, _S.OPEN): {_I.RECV_DATA: _S.OPEN},
    (False, _S.IDLE): {_I.RECV_REQUEST: _S.REQUESTED},
    (False, _S.REQUESTED): {_I.SEND_OK: _S.OPEN, _I.SEND_REFUSED: _S.REFUSED},
    (False, _S.OPEN): {_I.RECV_DATA: _S.OPEN},
}


class CircuitSession:
    """One hop of a circuit, seen from one end of its substream (see the module rules).

    Args:
        is_opener: True on the side that opened the substream and sends the request.
    """

    def __init__(self, *, is_opener: bool) -> None:
        self._is_opener = is_opener
        self._state = CircuitState.IDLE
        self._buffer = bytearray()
        self._output: list[bytes] = []
        self._events: list[RelayEvent] = []
        self._error: FrameError | None = None

    @property
    def state(self) -> CircuitState:
        """The session's state."""
        return self._state

    @property
    def is_opener(self) -> bool:
        """Whether this side opened the substream."""
        return self._is_opener

    # -- local calls -----------------------------------------------------------------

    def send_connect(
        self,
        target: PublicKey,
        *,
        via: tuple[PublicKey, ...] = (),
        origin: tuple[PublicKey, ...] = (),
    ) -> None:
        """Queue CONNECT (opener, once).

        Raises:
            ValueError: if the path breaks rule 1.
            LocalProtocolError: if this is not an idle opener.
        """
        message = encode_message(ConnectRequested(target=target, via=via, origin=origin))
        self._apply_local(_I.SEND_REQUEST)
        self._output.append(message)

    def send_incoming(self, origin: tuple[PublicKey, ...]) -> None:
        """Queue INCOMING (opener, once): ``origin[0]`` calls the receiver.

        Raises:
            ValueError: if ``origin`` breaks rule 1.
            LocalProtocolError: if this is not an idle opener.
        """
        message = encode_message(IncomingAnnounced(origin=origin))
        self._apply_local(_I.SEND_REQUEST)
        self._output.append(message)

    def accept(self) -> None:
        """Queue OK (acceptor, after the request): the circuit is open.

        Raises:
            LocalProtocolError: if no request is waiting for an answer.
        """
        self._apply_local(_I.SEND_OK)
        self._output.append(encode_message(CircuitAccepted()))

    def refuse(self, reason: RefusalReason | int, message: str = "") -> None:
        """Queue REFUSED (acceptor, after the request); the message is cut to fit.

        Raises:
            ValueError: if ``reason`` is not one byte.
            LocalProtocolError: if no request is waiting for an answer.
        """
        encoded = encode_message(CircuitRefused(reason=reason, message=message))
        self._apply_local(_I.SEND_REFUSED)
        self._output.append(encoded)

    # -- input and output ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the substream; decoded messages and data become events.

        Raises:
            FrameError: on malformed input or input the state does not allow (rule 2);
                the session is then `CircuitState.FAILED` (rule 3).
        """
        if self._error is not None:
            raise self._error
        if not data:
            return
        try:
            if self._state is CircuitState.OPEN:
                self._events.append(DataReceived(data=bytes(data)))
                return
            self._buffer += data
            while self._buffer:
                if self._is_open:  # opaque bytes that came with the OK
                    rest, self._buffer = bytes(self._buffer), bytearray()
                    self._events.append(DataReceived(data=rest))
                    return
                if not self._awaits_message:
                    self._apply_remote(_I.RECV_DATA, "bytes")  # raises: nothing may come now
                size, start = _read_prefix(self._buffer)
                if size is None or len(self._buffer) < start + size:
                    return
                body = bytes(self._buffer[start : start + size])
                del self._buffer[: start + size]
                self._handle(_decode_body(body))
        except FrameError as exc:
            self._state = CircuitState.FAILED
            self._error = exc
            self._buffer = bytearray()
            raise

    def data_to_send(self) -> bytes:
        """The bytes to write to the substream now (drains the queue)."""
        data = b"".join(self._output)
        self._output.clear()
        return data

    def next_event(self) -> RelayEvent | None:
        """The next event, or None."""
        return self._events.pop(0) if self._events else None

    # -- transitions -----------------------------------------------------------------

    def _handle(self, message: RelayMessage) -> None:
        match message:
            case ConnectRequested() | IncomingAnnounced():
                self._apply_remote(_I.RECV_REQUEST, type(message).__name__)
            case CircuitAccepted():
                self._apply_remote(_I.RECV_OK, type(message).__name__)
            case CircuitRefused():
                self._apply_remote(_I.RECV_REFUSED, type(message).__name__)
        self._events.append(message)

    @property
    def _is_open(self) -> bool:
        return self._state is CircuitState.OPEN

    @property
    def _awaits_message(self) -> bool:
        """Whether the peer may send a control message now (rule 2)."""
        if self._is_opener:
            return self._state is CircuitState.REQUESTED
        return self._state is CircuitState.IDLE

    def _apply_remote(self, given: _Input, what: str) -> None:
        following = _TRANSITIONS.get((self._is_opener, self._state), {}).get(given)
        if following is None:
            role = "opener" if self._is_opener else "acceptor"
            raise FrameError(
                f"relay {role} in state {self._state.value!r} cannot {given.value} ({what})"
            )
        self._state = following

    def _apply_local(self, given: _Input) -> None:
        following = _TRANSITIONS.get((self._is_opener, self._state), {}).get(given)
        if following is None:
            role = "opener" if self._is_opener else "acceptor"
            raise LocalProtocolError(
                f"relay {role} in state {self._state.value!r} cannot {given.value}"
            )
        self._state = following


# -- rate limiting ------------------------------------------------------------------------


class TokenBucket:
    """A token bucket: ``rate`` bytes per second on average, bursts of up to ``burst`` bytes.

    `reserve` always takes the bytes and returns how long the caller must wait before
    using them (the bucket may go into debt by one reservation), so a caller that
    sends one piece at a time and honours each delay never exceeds ``burst`` plus
    ``rate`` times the elapsed time.

    Args:
        rate: bytes per second (> 0).
        burst: the bucket's size in bytes (> 0); it starts full.
        now: the current time in seconds.

    Raises:
        ValueError: if ``rate`` or ``burst`` is not positive.
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and burst > 0):
            raise ValueError(f"rate and burst must be > 0, got {rate!r} and {burst!r}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def reserve(self, size: int, now: float) -> float:
        """Take ``size`` bytes' worth of tokens; return the seconds to wait before sending them."""
        if now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
        self._tokens -= size
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
