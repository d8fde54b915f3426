"""The stream state machine of the sans-IO multiplexer, as a transition table.

Each stream moves through `StreamState` on `StreamInput`s: local calls (``SEND_*``)
and received frames (``RECV_*``). `TRANSITIONS` lists every allowed (state, input)
pair; a missing pair is an error, local (`crdtswarm.errors.LocalProtocolError`, or
`crdtswarm.errors.StreamResetError` once the peer reset the stream) or remote
(`crdtswarm.errors.RemoteProtocolError`). `crdtswarm.protocol.mux` applies it.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "LOCAL_INPUTS",
    "RECEIVING",
    "SENDING",
    "TERMINAL",
    "TRANSITIONS",
    "StreamInput",
    "StreamState",
    "transition_error_text",
]


class StreamState(enum.Enum):
    """Where a stream is in its life; the last three are terminal (the stream is released)."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"
    RESET_LOCAL = "reset (local)"
    RESET_REMOTE = "reset (remote)"


class StreamInput(enum.Enum):
    """What can happen to a stream: a local call (``SEND_*``) or a received frame."""

    SEND_DATA = "send DATA"
    SEND_EOF = "send EOF"
    SEND_RESET = "send RESET"
    RECV_DATA = "receive DATA"
    RECV_EOF = "receive EOF"
    RECV_RESET = "receive RESET"
    RECV_WINDOW_UPDATE = "receive WINDOW_UPDATE"


_S = StreamState
_I = StreamInput

# (state, input) -> next state. A pair that is missing is an error: LocalProtocolError
# for a SEND_* input (StreamResetError once the peer reset the stream), RemoteProtocolError
# for a RECV_* one.
TRANSITIONS: Final[dict[StreamState, dict[StreamInput, StreamState]]] = {
    _S.OPEN: {
        _I.SEND_DATA: _S.OPEN,
        _I.SEND_EOF: _S.HALF_CLOSED_LOCAL,
        _I.SEND_RESET: _S.RESET_LOCAL,
        _I.RECV_DATA: _S.OPEN,
        _I.RECV_EOF: _S.HALF_CLOSED_REMOTE,
        _I.RECV_RESET: _S.RESET_REMOTE,
        _I.RECV_WINDOW_UPDATE: _S.OPEN,
    },
    _S.HALF_CLOSED_LOCAL: {
        _I.SEND_RESET: _S.RESET_LOCAL,
        _I.RECV_DATA: _S.HALF_CLOSED_LOCAL,
        _I.RECV_EOF: _S.CLOSED,
        _I.RECV_RESET: _S.RESET_REMOTE,
        _I.RECV_WINDOW_UPDATE: _S.HALF_CLOSED_LOCAL,
    },
    _S.HALF_CLOSED_REMOTE: {
        _I.SEND_DATA: _S.HALF_CLOSED_REMOTE,
        _I.SEND_EOF: _S.CLOSED,
        _I.SEND_RESET: _S.RESET_LOCAL,
        _I.RECV_RESET: _S.RESET_REMOTE,
        _I.RECV_WINDOW_UPDATE: _S.HALF_CLOSED_REMOTE,
    },
    _S.CLOSED: {
        _I.SEND_RESET: _S.CLOSED,
        _I.RECV_RESET: _S.CLOSED,
        _I.RECV_WINDOW_UPDATE: _S.CLOSED,
    },
    _S.RESET_LOCAL: {
        _I.SEND_RESET: _S.RESET_LOCAL,
        _I.RECV_DATA: _S.RESET_LOCAL,
        _I.RECV_EOF: _S.RESET_LOCAL,
        _I.RECV_RESET: _S.RESET_LOCAL,
        _I.RECV_WINDOW_UPDATE: _S.RESET_LOCAL,
    },
    _S.RESET_REMOTE: {
        _I.SEND_RESET: _S.RESET_REMOTE,
        _I.RECV_WINDOW_UPDATE: _S.RESET_REMOTE,
    },
}

TERMINAL: Final = frozenset({_S.CLOSED, _S.RESET_LOCAL, _S.RESET_REMOTE})
RECEIVING: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_LOCAL})  # the peer may still send
SENDING: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_REMOTE})  # we may still send
LOCAL_INPUTS: Final = frozenset({_I.SEND_DATA, _I.SEND_EOF, _I.SEND_RESET})


def transition_error_text(stream_id: int, state: StreamState, event: StreamInput) -> str:
    """Describe a forbidden (state, input) pair, from the side that broke the rule."""
    if event in LOCAL_INPUTS:
        return f"cannot {event.value} on stream {stream_id} in state {state.value}"
    return f"peer sent {event.value.split()[-1]} on stream {stream_id} in state {state.value}"
