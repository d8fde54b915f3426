"""Sans-IO stream multiplexer: many ordered, flow-controlled byte streams over one channel.

`MuxSession` runs over a secure channel that carries whole messages of at most
``MuxConfig.max_message_size`` bytes. Every message packs one or more whole frames;
small frames are batched into one message and a frame never straddles two messages.
The session does no I/O and reads no clock: inputs are method calls plus
`MuxSession.receive_message` and `MuxSession.handle_timer`, outputs are
`MuxSession.data_to_send`, `MuxSession.next_event` and `MuxSession.get_timer`.

Frame format (integers are lib0/LEB128 uvarints from `crdtswarm.protocol.wire`)::

    frame   = type:u8  stream_id:uvarint  length:uvarint  payload[length]
    message = frame+

    type  name           stream_id  payload
    0x00  DATA           >= 1       stream bytes (may be empty)
    0x01  OPEN           >= 1       protocol name, UTF-8, 1..max_protocol_name_size bytes
    0x02  WINDOW_UPDATE  >= 1       increment:uvarint (> 0), credit the receiver grants
    0x03  EOF            >= 1       empty; the sender will send no more DATA (half-close)
    0x04  RESET          >= 1       code:uvarint  reason:uvarint-length UTF-8 (<= 256 bytes)
    0x05  PING           0          token: 8 opaque bytes
    0x06  PONG           0          token: the 8 bytes of the PING it answers
    0x07  GOAWAY         0          code:uvarint  reason:uvarint-length UTF-8 (<= 256 bytes)

Invariants:

* Rule 1 (ids). The initiator opens odd stream ids and the responder even ones,
  each side counting up by two from its first id without gaps; ids are never
  reused. An OPEN with the wrong parity or not carrying the next id, or any other
  frame naming an id its opener has not reached yet, is a connection error.
* Rule 2 (credit). Every new stream starts with `PROTOCOL_WINDOW_SIZE` bytes of
  credit in each direction; a receiver whose ``initial_window_size`` is larger grants
  the difference at once with a WINDOW_UPDATE. A sender never sends more DATA than
  its credit, so for each live stream ``recv_window + unconsumed + owed == window``:
  the bytes received but not yet consumed by the application never exceed the
  stream's ``window``. DATA beyond the credit is a `FlowControlError`.
  Auto-tuning: ``window`` starts at ``initial_window_size`` and doubles (up to
  ``max_window_size``) when a grant falls due while the application has read
  everything (it is starved: the window, not the reader, limits throughput), as
  long as the windows of all streams stay within ``max_connection_window_size``.
  A slow reader always has unread data, so its window never grows.
* Rule 3 (lifetime). A stream is released when both sides have sent EOF or when
  either side reset it. Frames that race with a local reset or close are ignored,
  and DATA on a locally reset stream is still counted against its credit.
* Rule 4 (order). Within one `MuxSession.data_to_send` call, control frames (OPEN,
  RESET, PING, PONG) come first, then WINDOW_UPDATEs, then DATA and EOF round-robin
  across streams, then GOAWAY. So OPEN precedes its stream's DATA, and EOF follows
  its stream's DATA.
* Rule 5 (termination). Any violation by the peer moves the session to its
  terminal state, drops queued output, queues GOAWAY carrying the error's code and
  only then raises the typed error. Once terminal, incoming messages are ignored
  and stream operations raise `LocalProtocolError`.
* Rule 6 (bounds). Queued DATA is bounded by ``max_pending_frames_size``
  (`MuxSession.send_data` accepts less when the queue is full); control frames the
  peer provokes (PONG, refusals) are bounded by the same size, beyond which the
  peer is flooding us; pending grants are coalesced per stream; outstanding pings
  and remembered closed streams are bounded by count; and `receive_message`
  refuses to run while more than ``max_message_size`` events wait unread.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from crdtswarm.errors import (
    ErrorCode,
    FlowControlError,
    FrameError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamResetError,
)
from crdtswarm.protocol.mux_events import (
    ConnectionTerminated,
    DataReceived,
    MuxEvent,
    MuxStatistics,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from crdtswarm.protocol.mux_state import (
    LOCAL_INPUTS,
    RECEIVING,
    SENDING,
    TERMINAL,
    TRANSITIONS,
    StreamInput,
    StreamState,
    transition_error_text,
)
from crdtswarm.protocol.wire import MAX_UVARINT, Reader, encode_uvarint

__all__ = [
    "MAX_REASON_SIZE",
    "MAX_STREAM_ID",
    "MAX_WINDOW_SIZE",
    "PING_TOKEN_SIZE",
    "PROTOCOL_WINDOW_SIZE",
    "ConnectionTerminated",
    "DataReceived",
    "FrameType",
    "MuxConfig",
    "MuxEvent",
    "MuxSession",
    "MuxStatistics",
    "PongReceived",
    "StreamEnded",
    "StreamInput",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "WindowUpdated",
    "encode_frame",
]

PROTOCOL_WINDOW_SIZE: Final = 64 * 1024
"""Credit, in bytes, each side has on every new stream before any WINDOW_UPDATE."""
MAX_WINDOW_SIZE: Final = 2**31 - 1
"""Largest credit, in bytes, a stream may accumulate; more is a `FlowControlError`."""
MAX_STREAM_ID: Final = 2**32 - 1
"""Largest stream id either side may open."""
MAX_REASON_SIZE: Final = 256
"""Largest RESET or GOAWAY reason, in UTF-8 bytes; longer local reasons are truncated."""
PING_TOKEN_SIZE: Final = 8
"""Size of the opaque token a PING carries and its PONG echoes."""

_MIN_MESSAGE_SIZE: Final = 1024
_MAX_MESSAGE_SIZE: Final = 1 << 24  # keeps a DATA length within a 4-byte uvarint
_MIN_FRAGMENT: Final = 512  # rather start a new message than emit a smaller DATA piece
_MAX_OUTSTANDING_PINGS: Final = 16


class FrameType(enum.IntEnum):
    """The type byte that opens every frame."""

    DATA = 0x00
    OPEN = 0x01
    WINDOW_UPDATE = 0x02
    EOF = 0x03
    RESET = 0x04
    PING = 0x05
    PONG = 0x06
    GOAWAY = 0x07


# Plain ints for the hot path (IntEnum comparisons are slower).
_DATA: Final = 0x00
_OPEN: Final = 0x01
_WINDOW_UPDATE: Final = 0x02
_EOF: Final = 0x03
_RESET: Final = 0x04
_PING: Final = 0x05
_PONG: Final = 0x06
_GOAWAY: Final = 0x07


def encode_frame(frame_type: FrameType | int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode one frame: type byte, stream id, payload length and payload.

    Raises:
        ValueError: if ``frame_type`` is not a byte or ``stream_id`` is out of range.
    """
    if not 0 <= frame_type <= 0xFF:
        raise ValueError(f"frame type out of range: {frame_type}")
    return bytes((frame_type,)) + encode_uvarint(stream_id) + encode_uvarint(len(payload)) + payload


def _truncate_reason(message: str) -> bytes:
    raw = message.encode("utf-8", "replace")
    if len(raw) <= MAX_REASON_SIZE:
        return raw
    return raw[:MAX_REASON_SIZE].decode("utf-8", "ignore").encode("utf-8")


def _encode_close(frame_type: int, stream_id: int, code: int, message: str) -> bytes:
    reason = _truncate_reason(message)
    return encode_frame(
        frame_type, stream_id, encode_uvarint(code) + encode_uvarint(len(reason)) + reason
    )


def _check_code(code: ErrorCode | int) -> None:
    if isinstance(code, bool) or not 0 <= code <= MAX_UVARINT:
        raise ValueError(f"error code out of range: {code}")


# -- configuration, events, statistics ---------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class MuxConfig:
    """Limits and timers of a `MuxSession`.

    Raises:
        ValueError: on construction, if a value is out of range.
    """

    initial_window_size: int = 256 * 1024
    """Per-stream receive window in bytes, the bound of unread data per stream (default
    256 KiB; at least `PROTOCOL_WINDOW_SIZE`, at most `MAX_WINDOW_SIZE`)."""
    max_window_size: int = 8 * 1024 * 1024
    """Largest per-stream receive window auto-tuning may reach, in bytes (default
    8 MiB; at least ``initial_window_size``)."""
    max_connection_window_size: int = 32 * 1024 * 1024
    """Bound on the sum of all streams' receive windows, in bytes: the most unread
    data one connection can make us hold beyond ``initial_window_size`` per stream
    (default 32 MiB)."""
    max_streams: int = 256
    """Streams the peer may have open with us at once (default 256); an OPEN beyond
    this is answered with RESET(REFUSED)."""
    max_open_streams: int = 256
    """Streams we may have open ourselves at once (default 256); `MuxSession.open_stream`
    raises `LocalProtocolError` beyond this."""
    max_message_size: int = 65519
    """Largest outgoing message in bytes, frames packed inside (default 65519, the Noise
    plaintext limit; at least 1024)."""
    max_protocol_name_size: int = 64
    """Largest protocol name in an OPEN frame, in UTF-8 bytes (default 64)."""
    keepalive_interval: float = 10.0
    """Seconds without receiving anything after which we send a PING (default 10.0;
    ``math.inf`` disables keepalive pings)."""
    keepalive_timeout: float = 30.0
    """Seconds without receiving anything after which the peer is dead (default 30.0;
    ``math.inf`` disables the check)."""
    max_pending_frames_size: int = 1024 * 1024
    """Bytes of DATA we queue before `MuxSession.data_to_send` takes them, and bytes of
    peer-provoked control frames we queue before calling it a flood (default 1 MiB; at
    least ``max_message_size``)."""

    def __post_init__(self) -> None:
        if not PROTOCOL_WINDOW_SIZE <= self.initial_window_size <= MAX_WINDOW_SIZE:
            raise ValueError(
                f"initial_window_size must be in [{PROTOCOL_WINDOW_SIZE}, {MAX_WINDOW_SIZE}]"
            )
        if not self.initial_window_size <= self.max_window_size <= MAX_WINDOW_SIZE:
            raise ValueError("max_window_size must be in [initial_window_size, MAX_WINDOW_SIZE]")
        if self.max_streams < 0 or self.max_open_streams < 0:
            raise ValueError("max_streams and max_open_streams must not be negative")
        if not _MIN_MESSAGE_SIZE <= self.max_message_size <= _MAX_MESSAGE_SIZE:
            raise ValueError(
                f"max_message_size must be in [{_MIN_MESSAGE_SIZE}, {_MAX_MESSAGE_SIZE}]"
            )
        if not 1 <= self.max_protocol_name_size <= 255:
            raise ValueError("max_protocol_name_size must be in [1, 255]")
        if not (self.keepalive_interval > 0 and self.keepalive_timeout > 0):
            raise ValueError("keepalive_interval and keepalive_timeout must be positive")
        if self.max_pending_frames_size < self.max_message_size:
            raise ValueError("max_pending_frames_size must be at least max_message_size")


_DEFAULT_CONFIG: Final = MuxConfig()


class _Stream:
    """Per-stream state and flow-control accounting (see Rule 2)."""

    __slots__ = (
        "data_prefix",
        "eof_pending",
        "grant_pending",
        "id",
        "is_local",
        "owed",
        "protocol",
        "recv_window",
        "reset_code",
        "reset_message",
        "scheduled",
        "send_buffer",
        "send_buffered",
        "send_window",
        "state",
        "unconsumed",
        "window",
    )

    def __init__(self, stream_id: int, protocol: str, *, is_local: bool) -> None:
        self.id = stream_id
        self.protocol = protocol
        self.is_local = is_local
        self.state = StreamState.OPEN
        self.send_window = PROTOCOL_WINDOW_SIZE  # credit the peer granted us
        self.recv_window = PROTOCOL_WINDOW_SIZE  # credit we granted the peer, not yet used
        self.unconsumed = 0  # delivered in DataReceived, not yet consumed
        self.owed = 0  # consumed, not yet granted back
        self.window = PROTOCOL_WINDOW_SIZE  # recv_window + unconsumed + owed (Rule 2)
        self.grant_pending = 0  # granted, WINDOW_UPDATE not yet sent
        self.send_buffer: deque[bytes | memoryview] = deque()
        self.send_buffered = 0
        self.eof_pending = False
        self.scheduled = False
        self.data_prefix = bytes((_DATA,)) + encode_uvarint(stream_id)
        self.reset_code: ErrorCode | int = ErrorCode.NO_ERROR
        self.reset_message = ""

    def take(self, size: int) -> list[bytes | memoryview]:
        """Remove the first ``size`` queued bytes, without copying them."""
        buffer = self.send_buffer
        out: list[bytes | memoryview] = []
        self.send_buffered -= size
        while size:
            piece = buffer[0]
            n = len(piece)
            if n <= size:
                out.append(buffer.popleft())
                size -= n
            else:
                view = piece if isinstance(piece, memoryview) else memoryview(piece)
                out.append(view[:size])
                buffer[0] = view[size:]
                size = 0
        return out

    def drop_output(self) -> int:
        """Forget queued DATA, EOF and grants; return how many DATA bytes were dropped."""
        dropped = self.send_buffered
        self.send_buffer.clear()
        self.send_buffered = 0
        self.eof_pending = False
        self.grant_pending = 0
        return dropped


class _Packer:
    """Packs whole frames into messages of at most ``limit`` bytes."""

    __slots__ = ("limit", "messages", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages: list[bytes] = []
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def add(self, frame: bytes) -> None:
        if self.size + len(frame) > self.limit:
            self.flush()
        self.parts.append(frame)
        self.size += len(frame)

    def flush(self) -> None:
        if self.parts:
            self.messages.append(b"".join(self.parts))
            self.parts = []
            self.size = 0


def _transition_error(stream: _Stream, event: StreamInput) -> Exception:
    text = transition_error_text(stream.id, stream.state, event)
    if event in LOCAL_INPUTS:
        if stream.state is StreamState.RESET_REMOTE:
            return StreamResetError(stream.reset_code, stream.reset_message, remote=True)
        return LocalProtocolError(text)
    return RemoteProtocolError(text)


# -- the session ----------------------------------------------------------------------


class MuxSession:
    """One side of a multiplexed connection, without I/O.

    Args:
        is_initiator: True on the side that dialled (it opens odd stream ids).
        config: limits and timers.
        now: the current time in seconds, starting the keepalive clock.
    """

    def __init__(
        self, *, is_initiator: bool, config: MuxConfig = _DEFAULT_CONFIG, now: float = 0.0
    ) -> None:
        self._config = config
        self._is_initiator = is_initiator
        self._max_message_size = config.max_message_size
        self._max_pending = config.max_pending_frames_size
        self._window_size = config.initial_window_size
        self._extra_grant = config.initial_window_size - PROTOCOL_WINDOW_SIZE
        self._max_window = config.max_window_size
        self._window_budget = config.max_connection_window_size  # for auto-tuning growth
        self._local_parity = 1 if is_initiator else 0
        self._next_local_id = 1 if is_initiator else 2
        self._last_remote_id = 0 if is_initiator else -1
        self._streams: dict[int, _Stream] = {}
        self._ended: dict[int, _Stream] = {}  # released streams, oldest first, bounded
        self._max_ended = max(1, config.max_streams + config.max_open_streams)
        self._local_count = 0
        self._remote_count = 0
        # output queues (Rule 4)
        self._control: deque[bytes] = deque()
        self._provoked_size = 0  # bytes of peer-provoked control frames in _control
        self._grants: dict[int, _Stream] = {}
        self._ready: deque[_Stream] = deque()
        self._data_pending = 0
        self._goaway: bytes | None = None
        self._closed = False
        self._events: deque[MuxEvent] = deque()
        self._window_updated: dict[int, _Stream] = {}
        # keepalive
        self._last_received = now
        self._last_keepalive = now
        self._ping_count = 0
        self._pings: dict[bytes, tuple[int, float]] = {}
        # statistics
        self._streams_opened = 0
        self._streams_refused = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._frames_sent = 0
        self._frames_received = 0
        self._messages_sent = 0
        self._messages_received = 0

    # -- properties and queries ---------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """Whether the session has reached its terminal state (closed, aborted or timed out)."""
        return self._closed

    @property
    def is_initiator(self) -> bool:
        """Whether this side dialled the connection (and opens odd stream ids)."""
        return self._is_initiator

    @property
    def config(self) -> MuxConfig:
        """The configuration this session runs with."""
        return self._config

    def stream_protocol(self, stream_id: int) -> str:
        """Return the protocol name stream ``stream_id`` was opened for.

        Raises:
            LocalProtocolError: if the session has no record of the stream.
        """
        return self._known(stream_id).protocol

    def stream_state(self, stream_id: int) -> StreamState:
        """Return the state of stream ``stream_id``.

        Raises:
            LocalProtocolError: if the session has no record of the stream.
        """
        return self._known(stream_id).state

    def send_window(self, stream_id: int) -> int:
        """Return the peer's credit on ``stream_id``: the bytes we may send now.

        It is 0 once the session or our side of the stream has ended. `send_data` may
        accept fewer bytes than this while the outgoing queue holds
        ``max_pending_frames_size`` bytes; `data_to_send` empties it.

        Raises:
            LocalProtocolError: if the stream was never opened.
        """
        if self._closed:
            return 0
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id not in self._ended and not self._was_opened(stream_id):
                raise LocalProtocolError(f"unknown stream {stream_id}")
            return 0
        return stream.send_window if stream.state in SENDING else 0

    def statistics(self) -> MuxStatistics:
        """Return a snapshot of the session's counters."""
        return MuxStatistics(
            open_streams=len(self._streams),
            local_streams=self._local_count,
            remote_streams=self._remote_count,
            streams_opened=self._streams_opened,
            streams_refused=self._streams_refused,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            pending_send_size=self._data_pending,
        )

    # -- local stream operations --------------------------------------------------------

    def open_stream(self, protocol: str) -> int:
        """Open a stream for ``protocol`` and return its id; DATA may follow at once.

        Raises:
            ValueError: if ``protocol`` is empty, not encodable or longer than
                ``max_protocol_name_size`` UTF-8 bytes.
            LocalProtocolError: if the session is closed, ``max_open_streams`` of our
                streams are open, or stream ids are exhausted.
        """
        try:
            name = protocol.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"protocol name is not valid UTF-8: {protocol!r}") from exc
        if not 1 <= len(name) <= self._config.max_protocol_name_size:
            raise ValueError(
                f"protocol name must be 1 to {self._config.max_protocol_name_size} bytes"
            )
        if self._closed:
            raise LocalProtocolError("the session is closed")
        if self._local_count >= self._config.max_open_streams:
            raise LocalProtocolError(f"too many open streams ({self._local_count})")
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids are exhausted")
        self._next_local_id += 2
        stream = _Stream(stream_id, protocol, is_local=True)
        self._streams[stream_id] = stream
        self._local_count += 1
        self._streams_opened += 1
        self._control.append(encode_frame(_OPEN, stream_id, name))
        self._grant_initial(stream)
        return stream_id

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Queue up to ``min(len(data), send_window(stream_id))`` bytes of ``data``.

        Fewer bytes are accepted while the outgoing queue is full (it holds at most
        ``max_pending_frames_size`` bytes of DATA until `data_to_send` takes them).
        The accepted bytes are not copied: do not mutate ``data`` afterwards.

        Returns:
            How many leading bytes of ``data`` were accepted; 0 when there is no
            credit or no room in the queue.

        Raises:
            LocalProtocolError: if the session is closed, the stream is unknown, or we
                already ended or reset it.
            StreamResetError: if the peer reset the stream.
        """
        stream = self._stream_for_local(stream_id, StreamInput.SEND_DATA)
        n = len(data)
        credit = stream.send_window
        room = self._max_pending - self._data_pending
        if n > credit:
            n = credit
        if n > room:
            n = room
        if n <= 0:
            return 0
        stream.send_buffer.append(data if n == len(data) else memoryview(data)[:n])
        stream.send_buffered += n
        stream.send_window -= n
        self._data_pending += n
        if not stream.scheduled:
            stream.scheduled = True
            self._ready.append(stream)
        return n

    def send_eof(self, stream_id: int) -> None:
        """Half-close our side of ``stream_id``: EOF follows the data queued so far.

        Raises:
            LocalProtocolError: if the session is closed, the stream is unknown, or we
                already ended or reset it.
            StreamResetError: if the peer reset the stream.
        """
        stream = self._stream_for_local(stream_id, StreamInput.SEND_EOF)
        stream.state = TRANSITIONS[stream.state][StreamInput.SEND_EOF]
        stream.eof_pending = True
        if not stream.scheduled:
            stream.scheduled = True
            self._ready.append(stream)
        if stream.state is StreamState.CLOSED:
            self._release(stream)  # the ready queue keeps it until its EOF is out

    def reset_stream(self, stream_id: int, code: ErrorCode | int, message: str = "") -> None:
        """Abort ``stream_id`` in both directions, telling the peer ``code`` and ``message``.

        Queued data is dropped. Resetting a stream that has already ended, or doing
        so after the session closed, does nothing. ``message`` is truncated to
        `MAX_REASON_SIZE` UTF-8 bytes.

        Raises:
            ValueError: if ``code`` is negative or too large.
            LocalProtocolError: if the stream was never opened.
        """
        _check_code(code)
        if self._closed:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id in self._ended or self._was_opened(stream_id):
                return
            raise LocalProtocolError(f"unknown stream {stream_id}")
        stream.state = TRANSITIONS[stream.state][StreamInput.SEND_RESET]
        self._data_pending -= stream.drop_output()
        self._grants.pop(stream_id, None)
        stream.reset_code = code
        stream.reset_message = message
        self._control.append(_encode_close(_RESET, stream_id, code, message))
        self._release(stream)

    def consume(self, stream_id: int, size: int) -> None:
        """Tell the session that the application has read ``size`` bytes of ``stream_id``.

        The credit is returned to the peer with a WINDOW_UPDATE once at least half a
        window is owed, so small reads are batched. Consuming on a stream that has
        ended or after the session closed does nothing.

        Raises:
            ValueError: if ``size`` is negative or more than was received and not yet
                consumed.
            LocalProtocolError: if the stream was never opened.
        """
        if size < 0:
            raise ValueError(f"negative size: {size}")
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id in self._ended or self._was_opened(stream_id):
                return
            raise LocalProtocolError(f"unknown stream {stream_id}")
        if size > stream.unconsumed:
            raise ValueError(
                f"consumed {size} bytes on stream {stream_id} but only "
                f"{stream.unconsumed} are unread"
            )
        stream.unconsumed -= size
        if self._closed or stream.state not in RECEIVING:
            return
        owed = stream.owed + size
        window = stream.window
        if owed * 2 >= window:
            if stream.unconsumed == 0 and window < self._max_window:  # starved: grow
                growth = min(window, self._max_window - window, self._window_budget)
                self._window_budget -= growth
                stream.window = window + growth
                owed += growth
            stream.owed = 0
            stream.recv_window += owed
            stream.grant_pending += owed
            self._grants[stream_id] = stream
        else:
            stream.owed = owed

    # -- connection operations ------------------------------------------------------

    def ping(self, now: float) -> int:
        """Send a PING; a `PongReceived` event with the same ``ping_id`` reports the RTT.

        Returns:
            The ping's id. Only the latest 16 unanswered pings are remembered.

        Raises:
            LocalProtocolError: if the session is closed.
        """
        if self._closed:
            raise LocalProtocolError("the session is closed")
        self._ping_count += 1
        token = self._ping_count.to_bytes(PING_TOKEN_SIZE, "big")
        if len(self._pings) >= _MAX_OUTSTANDING_PINGS:
            del self._pings[next(iter(self._pings))]
        self._pings[token] = (self._ping_count, now)
        self._control.append(encode_frame(_PING, 0, token))
        return self._ping_count

    def close(self, code: ErrorCode | int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Queue GOAWAY after the data already queued, and enter the terminal state.

        Closing twice does nothing. ``message`` is truncated to `MAX_REASON_SIZE` bytes.

        Raises:
            ValueError: if ``code`` is negative or too large.
        """
        _check_code(code)
        if self._closed:
            return
        self._closed = True
        self._goaway = _encode_close(_GOAWAY, 0, code, message)

    def get_timer(self) -> float | None:
        """Return the absolute time at which `handle_timer` should run, or None."""
        if self._closed:
            return None
        config = self._config
        deadline = self._last_received + config.keepalive_timeout
        next_ping = max(self._last_received, self._last_keepalive) + config.keepalive_interval
        timer = min(deadline, next_ping)
        return None if timer == math.inf else timer

    def handle_timer(self, now: float) -> None:
        """Send a keepalive PING when idle, or end the session when the peer is silent.

        After ``keepalive_timeout`` seconds without receiving anything, the session
        queues GOAWAY(TIMEOUT), enters its terminal state and queues
        ``ConnectionTerminated(code=TIMEOUT, remote=False)``.
        """
        if self._closed:
            return
        config = self._config
        if now >= self._last_received + config.keepalive_timeout:
            message = f"nothing received for {now - self._last_received:.1f} s"
            self._abort(ErrorCode.TIMEOUT, message)
            self._events.append(
                ConnectionTerminated(code=ErrorCode.TIMEOUT, message=message, remote=False)
            )
        elif now >= max(self._last_received, self._last_keepalive) + config.keepalive_interval:
            self._last_keepalive = now
            self.ping(now)

    # -- output -------------------------------------------------------------------------

    @property
    def has_data_to_send(self) -> bool:
        """Whether `data_to_send` would return anything now."""
        return bool(self._control or self._grants or self._ready or self._goaway is not None)

    def data_to_send(self, now: float) -> list[bytes]:
        """Return every queued frame packed into messages of at most ``max_message_size``.

        Args:
            now: the current time in seconds (reserved for pacing; unused today).
        """
        del now
        packer = _Packer(self._max_message_size)
        frames = len(self._control)
        for frame in self._control:
            packer.add(frame)
        self._control.clear()
        self._provoked_size = 0
        for stream in self._grants.values():
            if stream.grant_pending:
                increment = encode_uvarint(stream.grant_pending)
                packer.add(encode_frame(_WINDOW_UPDATE, stream.id, increment))
                stream.grant_pending = 0
                frames += 1
        self._grants.clear()
        frames += self._pack_data(packer)
        if self._goaway is not None:
            packer.add(self._goaway)
            self._goaway = None
            frames += 1
        packer.flush()
        self._frames_sent += frames
        self._messages_sent += len(packer.messages)
        return packer.messages

    def _pack_data(self, packer: _Packer) -> int:
        """Pack queued DATA and EOF round-robin, one message's worth per turn; count frames."""
        limit = packer.limit
        ready = self._ready
        length_size = len(encode_uvarint(limit))
        sent = frames = 0
        while ready:
            stream = ready.popleft()
            quantum = limit
            prefix = stream.data_prefix
            overhead = len(prefix) + length_size
            while stream.send_buffered and quantum > 0:
                want = min(stream.send_buffered, quantum)
                room = limit - packer.size - overhead
                if room < want and room < _MIN_FRAGMENT:
                    packer.flush()
                    continue
                size = min(want, room)
                header = prefix + encode_uvarint(size)
                packer.parts.append(header)
                packer.parts.extend(stream.take(size))
                packer.size += len(header) + size
                quantum -= size
                sent += size
                frames += 1
            if stream.send_buffered:
                ready.append(stream)
                continue
            stream.scheduled = False
            if stream.eof_pending:
                stream.eof_pending = False
                packer.add(encode_frame(_EOF, stream.id))
                frames += 1
        self._data_pending -= sent
        self._bytes_sent += sent
        return frames

    def next_event(self) -> MuxEvent | None:
        """Return the oldest queued event, or None when there is none."""
        events = self._events
        return events.popleft() if events else None

    # -- input ----------------------------------------------------------------------------

    def receive_message(self, message: bytes, now: float) -> None:
        """Process every frame of one message from the peer, queueing events.

        Messages arriving after the session closed are ignored.

        Raises:
            FrameError: if a frame is malformed, truncated, of unknown type or has an
                oversized field.
            FlowControlError: if the peer sent more DATA than its credit.
            RemoteProtocolError: on any other violation (bad stream id, DATA after
                EOF, ...). Before any of these, the session enters its terminal state
                and queues GOAWAY with the error's code.
            LocalProtocolError: if more than ``max_message_size`` events wait unread
                (drain `next_event` after every message).
        """
        if self._closed:
            return
        if len(self._events) > self._max_message_size:
            raise LocalProtocolError("too many unread events: drain next_event() first")
        self._last_received = now
        self._messages_received += 1
        try:
            self._receive_frames(message, now)
        except RemoteProtocolError as exc:
            self._window_updated.clear()
            self._abort(exc.code, str(exc))
            raise
        if self._window_updated:
            for stream in self._window_updated.values():
                if stream.state in SENDING and not self._closed:
                    self._events.append(WindowUpdated(stream_id=stream.id))
            self._window_updated.clear()

    def _receive_frames(self, message: bytes, now: float) -> None:
        reader = Reader(message)
        events = self._events
        streams = self._streams
        frames = 0
        try:
            while not reader.at_end():
                frame_type = reader.read_u8()
                stream_id = reader.read_uvarint()
                payload = reader.read_bytes(reader.read_uvarint())
                frames += 1
                if frame_type == _DATA:
                    stream = streams.get(stream_id)
                    if stream is None or stream.state not in RECEIVING:
                        self._on_rare_data(stream_id, stream, len(payload))
                        continue
                    n = len(payload)
                    if n > stream.recv_window:
                        raise FlowControlError(
                            f"stream {stream_id}: {n} bytes of DATA exceed the "
                            f"{stream.recv_window} bytes of credit"
                        )
                    stream.recv_window -= n
                    stream.unconsumed += n
                    self._bytes_received += n
                    if n:
                        events.append(DataReceived(stream_id=stream_id, data=payload))
                elif frame_type == _WINDOW_UPDATE:
                    self._on_window_update(stream_id, payload)
                elif frame_type == _OPEN:
                    self._on_open(stream_id, payload)
                elif frame_type == _EOF:
                    self._on_eof(stream_id, payload)
                elif frame_type == _RESET:
                    self._on_reset(stream_id, payload)
                elif frame_type in (_PING, _PONG):
                    self._on_ping(frame_type, stream_id, payload, now)
                elif frame_type == _GOAWAY:
                    self._on_goaway(stream_id, payload)
                    return
                else:
                    raise FrameError(f"unknown frame type {frame_type:#04x}")
        finally:
            self._frames_received += frames

    # -- frame handlers ---------------------------------------------------------------

    def _on_rare_data(self, stream_id: int, stream: _Stream | None, size: int) -> None:
        if stream is None:
            stream = self._lookup(stream_id, "DATA")
            if stream is None:
                return  # a stream released long ago: a race, ignored
        self._bytes_received += size
        self._apply_remote(stream, StreamInput.RECV_DATA)  # raises unless ignorable
        if size > stream.recv_window:
            raise FlowControlError(
                f"stream {stream_id}: {size} bytes of DATA exceed the "
                f"{stream.recv_window} bytes of credit"
            )
        stream.recv_window -= size

    def _on_open(self, stream_id: int, payload: bytes) -> None:
        if stream_id & 1 == self._local_parity:
            raise RemoteProtocolError(f"peer opened stream {stream_id}, an id of our parity")
        if stream_id != self._last_remote_id + 2 or stream_id > MAX_STREAM_ID:
            raise RemoteProtocolError(
                f"peer opened stream {stream_id}; its next id is {self._last_remote_id + 2}"
            )
        if not 1 <= len(payload) <= self._config.max_protocol_name_size:
            raise FrameError(f"OPEN with a protocol name of {len(payload)} bytes")
        try:
            protocol = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError("OPEN with a protocol name that is not UTF-8") from exc
        self._last_remote_id = stream_id
        stream = _Stream(stream_id, protocol, is_local=False)
        if self._remote_count >= self._config.max_streams:
            self._streams_refused += 1
            stream.state = StreamState.RESET_LOCAL
            stream.reset_code = ErrorCode.REFUSED
            self._remember(stream)
            frame = _encode_close(_RESET, stream_id, ErrorCode.REFUSED, "too many streams")
            self._queue_provoked(frame)
            return
        self._streams[stream_id] = stream
        self._remote_count += 1
        self._streams_opened += 1
        self._events.append(StreamOpened(stream_id=stream_id, protocol=protocol))
        self._grant_initial(stream)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        reader = Reader(payload)
        increment = reader.read_uvarint()
        if not reader.at_end():
            raise FrameError("WINDOW_UPDATE with trailing bytes")
        if increment == 0:
            raise RemoteProtocolError(f"WINDOW_UPDATE of 0 on stream {stream_id}")
        stream = self._streams.get(stream_id) or self._lookup(stream_id, "WINDOW_UPDATE")
        if stream is None:
            return
        self._apply_remote(stream, StreamInput.RECV_WINDOW_UPDATE)
        if stream.state not in SENDING:
            return
        window = stream.send_window + increment
        if window > MAX_WINDOW_SIZE:
            raise FlowControlError(f"stream {stream_id}: credit grew beyond {MAX_WINDOW_SIZE}")
        stream.send_window = window
        self._window_updated[stream_id] = stream

    def _on_eof(self, stream_id: int, payload: bytes) -> None:
        if payload:
            raise FrameError("EOF with a payload")
        stream = self._streams.get(stream_id) or self._lookup(stream_id, "EOF")
        if stream is None:
            return
        old = self._apply_remote(stream, StreamInput.RECV_EOF)
        if old in RECEIVING:
            stream.owed = 0
            if stream.grant_pending:
                stream.grant_pending = 0
                self._grants.pop(stream_id, None)
            self._events.append(StreamEnded(stream_id=stream_id))
            if stream.state is StreamState.CLOSED:
                self._release(stream)

    def _on_reset(self, stream_id: int, payload: bytes) -> None:
        code, reason = self._read_close(payload, "RESET")
        stream = self._streams.get(stream_id) or self._lookup(stream_id, "RESET")
        if stream is None:
            return
        old = self._apply_remote(stream, StreamInput.RECV_RESET)
        if old in TERMINAL:
            return
        self._data_pending -= stream.drop_output()
        self._grants.pop(stream_id, None)
        stream.reset_code = code
        stream.reset_message = reason
        self._events.append(StreamReset(stream_id=stream_id, code=code, message=reason))
        self._release(stream)

    def _on_ping(self, frame_type: int, stream_id: int, payload: bytes, now: float) -> None:
        if stream_id != 0:
            raise FrameError(f"PING/PONG on stream {stream_id}")
        if len(payload) != PING_TOKEN_SIZE:
            raise FrameError(f"PING/PONG with a {len(payload)}-byte token")
        if frame_type == _PING:
            self._queue_provoked(encode_frame(_PONG, 0, payload))
            return
        pending = self._pings.pop(payload, None)
        if pending is not None:
            ping_id, sent = pending
            self._events.append(PongReceived(rtt=max(0.0, now - sent), ping_id=ping_id))

    def _on_goaway(self, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise FrameError(f"GOAWAY on stream {stream_id}")
        code, reason = self._read_close(payload, "GOAWAY")
        self._closed = True
        self._drop_all_output()
        self._events.append(ConnectionTerminated(code=code, message=reason, remote=True))

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _read_close(payload: bytes, name: str) -> tuple[ErrorCode | int, str]:
        reader = Reader(payload)
        code = ErrorCode.parse(reader.read_uvarint())
        reason = reader.read_var_string(MAX_REASON_SIZE)
        if not reader.at_end():
            raise FrameError(f"{name} with trailing bytes")
        return code, reason

    def _was_opened(self, stream_id: int) -> bool:
        """Whether ``stream_id`` was opened at some point by either side."""
        if stream_id <= 0:
            return False
        if stream_id & 1 == self._local_parity:
            return stream_id < self._next_local_id
        return stream_id <= self._last_remote_id

    def _known(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id) or self._ended.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"no record of stream {stream_id}")
        return stream

    def _lookup(self, stream_id: int, frame_name: str) -> _Stream | None:
        """Find the target of a stream frame; None when released long ago (ignore it).

        Raises:
            FrameError: on stream id 0.
            RemoteProtocolError: if the stream was never opened.
        """
        stream = self._ended.get(stream_id)
        if stream is not None:
            return stream
        if stream_id == 0:
            raise FrameError(f"{frame_name} frame on stream 0")
        if not self._was_opened(stream_id):
            raise RemoteProtocolError(f"{frame_name} frame on stream {stream_id}, never opened")
        return None

    def _stream_for_local(self, stream_id: int, event: StreamInput) -> _Stream:
        """Return the live stream for a SEND_* input, or raise the right error."""
        if self._closed:
            raise LocalProtocolError("the session is closed")
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._ended.get(stream_id)
            if stream is None:
                known = "closed" if self._was_opened(stream_id) else "unknown"
                raise LocalProtocolError(f"{known} stream {stream_id}")
        if event not in TRANSITIONS[stream.state]:
            raise _transition_error(stream, event)
        return stream

    def _apply_remote(self, stream: _Stream, event: StreamInput) -> StreamState:
        """Move ``stream`` through the table for a received frame; return the old state."""
        old = stream.state
        new = TRANSITIONS[old].get(event)
        if new is None:
            raise _transition_error(stream, event)
        stream.state = new
        return old

    def _grant_initial(self, stream: _Stream) -> None:
        stream.window = self._window_size
        if self._extra_grant:
            stream.recv_window += self._extra_grant
            stream.grant_pending += self._extra_grant
            self._grants[stream.id] = stream

    def _release(self, stream: _Stream) -> None:
        """Move a stream that reached a terminal state from the live table to the tombstones."""
        if self._streams.pop(stream.id, None) is not None:
            self._window_budget += max(0, stream.window - self._window_size)
            if stream.is_local:
                self._local_count -= 1
            else:
                self._remote_count -= 1
        self._remember(stream)

    def _remember(self, stream: _Stream) -> None:
        ended = self._ended
        ended[stream.id] = stream
        if len(ended) > self._max_ended:
            del ended[next(iter(ended))]

    def _queue_provoked(self, frame: bytes) -> None:
        """Queue a control frame the peer made us send, refusing a flood (Rule 6)."""
        self._provoked_size += len(frame)
        if self._provoked_size > self._max_pending:
            raise RemoteProtocolError(
                "the peer provokes control frames faster than they are sent",
                code=ErrorCode.PROTOCOL_ERROR,
            )
        self._control.append(frame)

    def _drop_all_output(self) -> None:
        self._control.clear()
        self._provoked_size = 0
        self._grants.clear()
        for stream in self._ready:
            stream.drop_output()
            stream.scheduled = False
        self._ready.clear()
        self._data_pending = 0
        self._goaway = None

    def _abort(self, code: ErrorCode | int, message: str) -> None:
        """Enter the terminal state with only a GOAWAY left to send (Rule 5)."""
        self._closed = True
        self._drop_all_output()
        self._goaway = _encode_close(_GOAWAY, 0, code, message)
