"""Sans-IO request/response protocol, run over one mux substream.

Both sides of the substream may call and answer. Each message on the byte stream
is a uvarint length followed by the body; bodies are:

```
REQUEST   0x00 | id uvarint | method var_string | payload var_bytes
RESPONSE  0x01 | id uvarint | payload var_bytes
ERROR     0x02 | id uvarint | code uvarint | message var_string
CANCEL    0x03 | id uvarint                      (the caller gave up)
```

Invariants:

1. Every call id we issue is unique for the life of the session and stays in
   ``_calls`` until its RESPONSE, ERROR or our own cancel; answers for unknown ids
   are ignored (they race with cancels).
2. At most ``max_incoming_requests`` requests from the peer are unanswered at once;
   beyond that a request is answered at once with ERROR(REFUSED).
3. Every buffer is bounded: the input buffer by ``max_message_size`` plus a header,
   queued output by what callers queue (each call waits for its answer).
4. Any malformed input moves the session to a terminal state and raises
   `crdtswarm.errors.FrameError`; nothing is processed after that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from crdtswarm.errors import ErrorCode, FrameError, LocalProtocolError
from crdtswarm.protocol.wire import Reader, encode_uvarint, encode_var_bytes, encode_var_string

__all__ = [
    "CallCancelled",
    "ErrorReceived",
    "RequestReceived",
    "ResponseReceived",
    "RpcConfig",
    "RpcEvent",
    "RpcSession",
]

MAX_METHOD_SIZE: Final = 128
MAX_ERROR_MESSAGE_SIZE: Final = 1024
_MAX_HEADER_SIZE: Final = 10


class _Type(enum.IntEnum):
    REQUEST = 0
    RESPONSE = 1
    ERROR = 2
    CANCEL = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class RpcConfig:
    """Limits of an RPC session."""

    max_message_size: int = 1024 * 1024
    """Largest request or response body, in bytes (default 1 MiB)."""
    max_incoming_requests: int = 64
    """Unanswered requests from the peer we accept at once; more get REFUSED (default 64)."""
    max_outgoing_calls: int = 1024
    """Calls of ours that may wait for an answer at once (default 1024)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestReceived:
    """The peer called ``method``; answer with `RpcSession.respond` or `respond_error`."""

    request_id: int
    method: str
    payload: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseReceived:
    """The peer answered our call ``call_id``."""

    call_id: int
    payload: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class ErrorReceived:
    """The peer answered our call ``call_id`` with an error."""

    call_id: int
    code: ErrorCode | int
    message: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CallCancelled:
    """The peer gave up on its request ``request_id``; its answer is no longer wanted."""

    request_id: int


RpcEvent = RequestReceived | ResponseReceived | ErrorReceived | CallCancelled


class RpcSession:
    """Both ends of request/response over one byte stream."""

    def __init__(self, config: RpcConfig | None = None) -> None:
        self._config = config or RpcConfig()
        self._next_id = 1
        self._calls: set[int] = set()
        self._requests: set[int] = set()
        self._buffer = bytearray()
        self._output: list[bytes] = []
        self._events: list[RpcEvent] = []
        self._failed = False

    @property
    def pending_calls(self) -> int:
        """How many of our calls wait for an answer."""
        return len(self._calls)

    def call(self, method: str, payload: bytes) -> int:
        """Queue a request and return its call id.

        Raises:
            ValueError: if the method name or payload is too large.
            LocalProtocolError: if too many calls are pending or the session failed.
        """
        self._check_usable()
        encoded_method = method.encode("utf-8")
        if not encoded_method or len(encoded_method) > MAX_METHOD_SIZE:
            raise ValueError(f"RPC method names are 1 to {MAX_METHOD_SIZE} bytes: {method!r}")
        if len(payload) > self._config.max_message_size - MAX_METHOD_SIZE - 32:
            raise ValueError(f"RPC payload of {len(payload)} bytes is too large")
        if len(self._calls) >= self._config.max_outgoing_calls:
            raise LocalProtocolError("too many RPC calls waiting for an answer")
        call_id = self._next_id
        self._next_id += 1
        self._calls.add(call_id)
        self._queue(
            bytes((_Type.REQUEST,))
            + encode_uvarint(call_id)
            + encode_var_bytes(encoded_method)
            + encode_var_bytes(payload)
        )
        return call_id

    def cancel(self, call_id: int) -> None:
        """Give up on call ``call_id``: tell the peer, forget any answer."""
        if call_id in self._calls and not self._failed:
            self._calls.discard(call_id)
            self._queue(bytes((_Type.CANCEL,)) + encode_uvarint(call_id))

    def respond(self, request_id: int, payload: bytes) -> None:
        """Answer the peer's request. Answers to cancelled requests are dropped.

        Raises:
            ValueError: if the payload is too large.
        """
        if len(payload) > self._config.max_message_size - 32:
            raise ValueError(f"RPC response of {len(payload)} bytes is too large")
        if self._take_request(request_id):
            self._queue(
                bytes((_Type.RESPONSE,)) + encode_uvarint(request_id) + encode_var_bytes(payload)
            )

    def respond_error(self, request_id: int, code: ErrorCode | int, message: str = "") -> None:
        """Answer the peer's request with an error.

        Raises:
            ValueError: if ``code`` is not a valid uvarint (the request stays answerable).
        """
        encoded = _encode_error(request_id, code, message)
        if self._take_request(request_id):
            self._queue(encoded)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the stream; decoded messages become events.

        Raises:
            FrameError: on a malformed or oversized message; the session is then terminal.
        """
        self._check_usable()
        self._buffer += data
        try:
            while self._buffer:
                reader = Reader(bytes(self._buffer[:_MAX_HEADER_SIZE]))
                try:
                    size = reader.read_uvarint()
                except FrameError:
                    if len(self._buffer) >= _MAX_HEADER_SIZE:
                        raise
                    return  # the length prefix is still incomplete
                if size > self._config.max_message_size:
                    raise FrameError(
                        f"RPC message of {size} bytes exceeds {self._config.max_message_size}"
                    )
                start = reader.position
                if len(self._buffer) < start + size:
                    return
                body = bytes(self._buffer[start : start + size])
                del self._buffer[: start + size]
                self._handle(body)
        except FrameError:
            self._failed = True
            self._buffer.clear()
            raise

    def data_to_send(self) -> bytes:
        """The bytes to write to the stream now (drains the queue)."""
        data = b"".join(self._output)
        self._output.clear()
        return data

    def next_event(self) -> RpcEvent | None:
        """The next decoded event, or None."""
        return self._events.pop(0) if self._events else None

    def _handle(self, body: bytes) -> None:
        reader = Reader(body)
        kind = reader.read_u8()
        ident = reader.read_uvarint()
        if kind == _Type.REQUEST:
            method = reader.read_var_string(MAX_METHOD_SIZE)
            if not method:
                raise FrameError("RPC request with an empty method name")
            payload = reader.read_var_bytes(self._config.max_message_size)
            self._expect_end(reader)
            if ident in self._requests:
                raise FrameError(f"RPC request id {ident} reused while pending")
            if len(self._requests) >= self._config.max_incoming_requests:
                self._queue(_encode_error(ident, ErrorCode.REFUSED, "too many concurrent calls"))
                return
            self._requests.add(ident)
            self._events.append(RequestReceived(request_id=ident, method=method, payload=payload))
        elif kind == _Type.RESPONSE:
            payload = reader.read_var_bytes(self._config.max_message_size)
            self._expect_end(reader)
            if ident in self._calls:
                self._calls.discard(ident)
                self._events.append(ResponseReceived(call_id=ident, payload=payload))
        elif kind == _Type.ERROR:
            code = ErrorCode.parse(reader.read_uvarint())
            message = reader.read_var_string(MAX_ERROR_MESSAGE_SIZE)
            self._expect_end(reader)
            if ident in self._calls:
                self._calls.discard(ident)
                self._events.append(ErrorReceived(call_id=ident, code=code, message=message))
        elif kind == _Type.CANCEL:
            self._expect_end(reader)
            if ident in self._requests:
                self._requests.discard(ident)
                self._events.append(CallCancelled(request_id=ident))
        else:
            raise FrameError(f"unknown RPC message type {kind}")

    @staticmethod
    def _expect_end(reader: Reader) -> None:
        if not reader.at_end():
            raise FrameError(f"{reader.remaining} trailing bytes in an RPC message")

    def _take_request(self, request_id: int) -> bool:
        if request_id in self._requests and not self._failed:
            self._requests.discard(request_id)
            return True
        return False

    def _queue(self, body: bytes) -> None:
        self._output.append(encode_uvarint(len(body)))
        self._output.append(body)

    def _check_usable(self) -> None:
        if self._failed:
            raise LocalProtocolError("the RPC session failed on malformed input")


def _encode_error(request_id: int, code: ErrorCode | int, message: str) -> bytes:
    text = message.encode("utf-8")[:MAX_ERROR_MESSAGE_SIZE].decode("utf-8", "ignore")
    return (
        bytes((_Type.ERROR,))
        + encode_uvarint(request_id)
        + encode_uvarint(int(code))
        + encode_var_string(text)
    )
