"""The crdtswarm exception tree and the error codes sent on the wire.

```
CrdtSwarmError
├── ProtocolError            .code (sent on the wire when we abort)
│   ├── LocalProtocolError   we were asked to break the protocol
│   └── RemoteProtocolError  the peer sent something invalid
│       ├── FrameError
│       ├── FlowControlError
│       ├── HandshakeError
│       │   └── IdentityMismatchError
│       └── SignatureError
├── ConnectError(ConnectionError)   no transport produced a link; __cause__ says why
├── StreamResetError         .code, .message
├── RpcError                 .code, .message
│   └── RpcTimeoutError(TimeoutError)
├── RelayError
├── SyncError
└── UnsupportedBackendError
```

Resource errors come from anyio: ``ClosedResourceError`` (you closed it),
``BrokenResourceError`` (the peer or the transport died; ``__cause__`` says why),
``EndOfStream`` and ``WouldBlock``.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import enum

__all__ = [
    "ConnectError",
    "CrdtSwarmError",
    "ErrorCode",
    "FlowControlError",
    "FrameError",
    "HandshakeError",
    "IdentityMismatchError",
    "LocalProtocolError",
    "ProtocolError",
    "RelayError",
    "RemoteProtocolError",
    "RpcError",
    "RpcTimeoutError",
    "SignatureError",
    "StoreError",
    "StreamResetError",
    "SyncError",
    "UnsupportedBackendError",
]


class ErrorCode(enum.IntEnum):
    """Error codes carried on the wire by mux resets, connection aborts and RPC errors."""

    NO_ERROR = 0
    """Orderly close."""
    PROTOCOL_ERROR = 1
    """The peer violated the protocol."""
    INTERNAL_ERROR = 2
    """The sender failed internally."""
    FLOW_CONTROL_ERROR = 3
    """The peer sent more than its credit allowed."""
    FRAME_ERROR = 4
    """A frame could not be decoded or was too large."""
    REFUSED = 5
    """A stream or call was refused (limits, shutting down)."""
    UNKNOWN_PROTOCOL = 6
    """A stream was opened for a protocol nobody handles."""
    CANCELLED = 7
    """The stream or call was cancelled by its owner."""
    TIMEOUT = 8
    """The peer gave up waiting."""
    HANDSHAKE_ERROR = 9
    """The secure handshake failed."""
    UNKNOWN_METHOD = 10
    """An RPC named a method that has no handler."""
    APPLICATION_ERROR = 11
    """An application handler raised."""

    @classmethod
    def parse(cls, value: int) -> ErrorCode | int:
        """Return the known code for ``value``, or ``value`` itself when it is unknown."""
        try:
            return cls(value)
        except ValueError:
            return value


class CrdtSwarmError(Exception):
    """Base class of every error crdtswarm raises on purpose."""


class ProtocolError(CrdtSwarmError):
    """A protocol was violated; ``code`` is what we send (or got) on the wire when aborting."""

    code: ErrorCode = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """Raised when our own caller asked for something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """Raised when the peer sent something invalid; the link is dropped."""


class FrameError(RemoteProtocolError):
    """Raised when a frame is malformed, truncated or larger than the configured limit."""

    code = ErrorCode.FRAME_ERROR


class FlowControlError(RemoteProtocolError):
    """Raised when the peer sends more data than the credit we granted it."""

    code = ErrorCode.FLOW_CONTROL_ERROR


class HandshakeError(RemoteProtocolError):
    """Raised when the secure handshake fails: bad message, wrong swarm key, bad proof."""

    code = ErrorCode.HANDSHAKE_ERROR


class IdentityMismatchError(HandshakeError):
    """Raised when the peer proved an identity other than the one we dialled.

    Attributes:
        expected: the public key we dialled.
        actual: the public key the peer proved.
    """

    def __init__(self, message: str, *, expected: object, actual: object) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class SignatureError(RemoteProtocolError):
    """Raised when a signature made by a peer does not verify."""


class ConnectError(CrdtSwarmError, ConnectionError):
    """Raised when no transport could produce a secure link; ``__cause__`` says why."""


class StreamResetError(CrdtSwarmError):
    """Raised on a stream's operations after either side reset it.

    Attributes:
        code: the wire error code of the reset (an ``ErrorCode`` when known).
        message: the reason text the resetting side gave, possibly empty.
        remote: True when the peer reset the stream, False when we did.
    """

    def __init__(self, code: ErrorCode | int, message: str = "", *, remote: bool = True) -> None:
        who = "peer" if remote else "local side"
        text = f"stream reset by {who}: {code!s}"
        if message:
            text += f": {message}"
        super().__init__(text)
        self.code = code
        self.message = message
        self.remote = remote


class RpcError(CrdtSwarmError):
    """Raised by an RPC call that the remote side answered with an error.

    Attributes:
        code: the wire error code (an ``ErrorCode`` when known).
        message: the remote side's description.
    """

    def __init__(self, code: ErrorCode | int, message: str = "") -> None:
        super().__init__(f"{code!s}: {message}" if message else str(code))
        self.code = code
        self.message = message


class RpcTimeoutError(RpcError, TimeoutError):
    """Raised when an RPC call got no answer within its timeout."""

    def __init__(self, message: str = "call timed out") -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


class RelayError(CrdtSwarmError):
    """Raised when a relayed circuit cannot be built or breaks."""


class SyncError(CrdtSwarmError):
    """Raised when a peer sends a CRDT update that cannot be applied."""


class StoreError(CrdtSwarmError, OSError):
    """Raised when the document store in ``data_dir`` cannot be opened (damaged or locked)."""


class UnsupportedBackendError(CrdtSwarmError):
    """Raised when crdtswarm runs on an async backend other than asyncio."""
