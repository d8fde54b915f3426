"""RPC over a mux substream: `RpcChannel` drives `crdtswarm.protocol.rpc.RpcSession`.

Each side of a connection opens its own RPC stream (protocol `PROTOCOL`) for the
calls it makes and serves the calls arriving on the peer's. Calls carry opaque
bytes; handlers are ``async def handler(payload: bytes, remote_key: PublicKey) ->
bytes``. A handler that raises `crdtswarm.errors.RpcError` answers with its code and
message; any other exception answers ``INTERNAL_ERROR`` (and is logged here, not
sent). Calls time out with `crdtswarm.errors.RpcTimeoutError`, and the peer is told
to drop the request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from crdtswarm.errors import (
    ErrorCode,
    RemoteProtocolError,
    RpcError,
    RpcTimeoutError,
    StreamResetError,
)
from crdtswarm.protocol.rpc import (
    CallCancelled,
    ErrorReceived,
    RequestReceived,
    ResponseReceived,
    RpcConfig,
    RpcSession,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from crdtswarm.identity import PublicKey
    from crdtswarm.mux import MuxStream

__all__ = ["PING_METHOD", "PROTOCOL", "RpcChannel", "RpcHandler"]

logger = logging.getLogger(__name__)

PROTOCOL = "crdtswarm/rpc/1"
PING_METHOD = "crdtswarm.ping"

RpcHandler = Callable[[bytes, "PublicKey"], Awaitable[bytes]]
"""Answers one call: receives the payload and the caller's key, returns the answer."""


@dataclass(slots=True)
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    payload: bytes = b""
    error: RpcError | None = None


class RpcChannel:
    """Calls and answers over one byte stream.

    Run `serve` in a task (it returns when the stream ends); `call` from anywhere.
    Handlers for incoming requests run in ``task_group`` (at most
    ``config.max_incoming_requests`` at once; more are refused).
    """

    def __init__(
        self,
        stream: MuxStream,
        *,
        remote_key: PublicKey,
        handlers: Mapping[str, RpcHandler],
        task_group: TaskGroup,
        config: RpcConfig | None = None,
    ) -> None:
        self._stream = stream
        self._remote_key = remote_key
        self._handlers = handlers
        self._task_group = task_group
        self._session = RpcSession(config)
        self._waiters: dict[int, _Waiter] = {}
        self._running: dict[int, anyio.CancelScope] = {}
        self._send_lock = anyio.Lock()
        self._error: BaseException | None = None

    async def call(self, method: str, payload: bytes = b"", *, timeout: float = 10.0) -> bytes:
        """Call ``method`` on the peer and return its answer.

        Raises:
            RpcTimeoutError: no answer within ``timeout`` seconds.
            RpcError: the peer answered with an error (``.code``, ``.message``).
            anyio.BrokenResourceError: the connection died.
        """
        if self._error is not None:
            raise anyio.BrokenResourceError("the RPC stream has ended") from self._error
        call_id = self._session.call(method, payload)
        waiter = self._waiters[call_id] = _Waiter()
        try:
            await self._flush()
            with anyio.fail_after(timeout):
                await waiter.done.wait()
        except TimeoutError:
            self._session.cancel(call_id)
            await self._flush_quietly()
            raise RpcTimeoutError(f"{method} got no answer within {timeout:g} s") from None
        except BaseException:
            self._session.cancel(call_id)
            raise
        finally:
            self._waiters.pop(call_id, None)
        if waiter.error is not None:
            raise waiter.error
        return waiter.payload

    async def serve(self) -> None:
        """Read the stream until it ends, dispatching answers and requests."""
        try:
            while True:
                try:
                    data = await self._stream.receive()
                except anyio.EndOfStream:
                    break
                self._session.receive_data(data)
                self._dispatch()
                await self._flush()
        except RemoteProtocolError as exc:
            self._error = exc
            logger.warning("malformed RPC from %s: %s", self._remote_key.short, exc)
            await self._stream.reset(exc.code, str(exc))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, StreamResetError) as exc:
            self._error = exc
            logger.debug("RPC stream with %s ended: %r", self._remote_key.short, exc)
        finally:
            self._error = self._error or anyio.EndOfStream()
            for waiter in self._waiters.values():
                waiter.error = RpcError(ErrorCode.CANCELLED, "the connection ended")
                waiter.done.set()
            for scope in self._running.values():
                scope.cancel()

    def _dispatch(self) -> None:
        while (event := self._session.next_event()) is not None:
            match event:
                case ResponseReceived(call_id=call_id, payload=payload):
                    if (waiter := self._waiters.get(call_id)) is not None:
                        waiter.payload = payload
                        waiter.done.set()
                case ErrorReceived(call_id=call_id, code=code, message=message):
                    if (waiter := self._waiters.get(call_id)) is not None:
                        waiter.error = RpcError(code, message)
                        waiter.done.set()
                case RequestReceived(request_id=request_id, method=method, payload=payload):
                    handler = self._handlers.get(method)
                    if handler is None:
                        self._session.respond_error(
                            request_id, ErrorCode.UNKNOWN_METHOD, f"no method {method!r}"
                        )
                    else:
                        scope = self._running[request_id] = anyio.CancelScope()
                        self._task_group.start_soon(
                            self._answer, request_id, method, handler, payload, scope
                        )
                case CallCancelled(request_id=request_id):
                    if (running := self._running.pop(request_id, None)) is not None:
                        running.cancel()

    async def _answer(
        self,
        request_id: int,
        method: str,
        handler: RpcHandler,
        payload: bytes,
        scope: anyio.CancelScope,
    ) -> None:
        with scope:
            try:
                result = await handler(payload, self._remote_key)
            except RpcError as exc:
                self._session.respond_error(request_id, exc.code, exc.message)
            except Exception as exc:
                logger.exception("RPC handler %r failed", method)
                self._session.respond_error(
                    request_id, ErrorCode.INTERNAL_ERROR, type(exc).__name__
                )
            else:
                try:
                    self._session.respond(request_id, result)
                except ValueError as exc:
                    self._session.respond_error(request_id, ErrorCode.INTERNAL_ERROR, str(exc))
        self._running.pop(request_id, None)
        await self._flush_quietly()

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._session.data_to_send()
            if data:
                await self._stream.send(data)

    async def _flush_quietly(self) -> None:
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(5.0),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
        ):
            await self._flush()
