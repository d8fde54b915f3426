"""Events and statistics of the sans-IO multiplexer (`crdtswarm.protocol.mux`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from crdtswarm.errors import ErrorCode

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "MuxEvent",
    "MuxStatistics",
    "PongReceived",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamOpened:
    """The peer opened stream ``stream_id`` for ``protocol``."""

    stream_id: int
    protocol: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived:
    """``data`` arrived on ``stream_id``; call `MuxSession.consume` once it is read."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamEnded:
    """The peer half-closed ``stream_id``: it sends no more data."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReset:
    """The peer reset ``stream_id`` (or refused our OPEN) with ``code`` and ``message``."""

    stream_id: int
    code: ErrorCode | int
    message: str


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowUpdated:
    """Our send credit on ``stream_id`` grew; a blocked writer may retry."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PongReceived:
    """The peer answered ping ``ping_id`` after ``rtt`` seconds."""

    rtt: float
    ping_id: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionTerminated:
    """The session ended: the peer sent GOAWAY (``remote``) or stopped answering."""

    code: ErrorCode | int
    message: str
    remote: bool


MuxEvent: TypeAlias = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PongReceived
    | ConnectionTerminated
)
"""Every event `MuxSession.next_event` returns."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MuxStatistics:
    """A snapshot of a `MuxSession`'s counters."""

    open_streams: int
    """Streams not yet released, in both directions."""
    local_streams: int
    """Open streams we opened."""
    remote_streams: int
    """Open streams the peer opened."""
    streams_opened: int
    """Streams opened so far by either side, refused ones excluded."""
    streams_refused: int
    """Peer streams refused because ``max_streams`` were open."""
    bytes_sent: int
    """DATA payload bytes handed out by `MuxSession.data_to_send`."""
    bytes_received: int
    """DATA payload bytes received."""
    frames_sent: int
    """Frames handed out by `MuxSession.data_to_send`."""
    frames_received: int
    """Frames received."""
    messages_sent: int
    """Messages handed out by `MuxSession.data_to_send`."""
    messages_received: int
    """Messages received."""
    pending_send_size: int
    """DATA bytes queued and not yet taken by `MuxSession.data_to_send`."""
