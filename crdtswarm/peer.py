"""`Peer`: a direct, authenticated, multiplexed link to one other node.

A `Peer` object is stable for as long as the swarm stays linked to that node: if a
duplicate link replaces the current one (two nodes calling each other at once),
the same `Peer` carries on over the surviving link. Its methods fail with
``anyio.BrokenResourceError`` once the node is no longer linked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from crdtswarm.errors import ErrorCode
from crdtswarm.rpc import PING_METHOD, PROTOCOL, RpcChannel, RpcHandler
from crdtswarm.transport.abc import LinkAttribute

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyio.abc import TaskGroup

    from crdtswarm.identity import PublicKey
    from crdtswarm.mux import MuxConnection, MuxStream
    from crdtswarm.secure import SecureChannel

__all__ = ["APP_PREFIX", "Peer", "PeerStatistics"]

logger = logging.getLogger(__name__)

APP_PREFIX = "app/"
"""Application stream protocols travel as ``app/<name>`` so they cannot clash with ours."""

_RTT_GAIN = 1 / 8  # RFC 6298 smoothing


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerStatistics:
    """A snapshot of one peer link."""

    rtt: float | None
    """Smoothed round-trip time in seconds, None before the first ping."""
    transport: str
    """The transport scheme of the link (``"tcp"``, ``"mem"``, ...)."""
    remote_address: str | None
    """The remote end's transport address, when the transport knows it."""
    open_streams: int
    """Substreams currently open on the link."""
    bytes_sent: int
    """Mux payload bytes sent on the current link."""
    bytes_received: int
    """Mux payload bytes received on the current link."""
    is_initiator: bool
    """Whether this node dialled the current link."""


class _Connection:
    """One live link of a peer: its mux, the task group for its tasks, its RPC client."""

    def __init__(self, channel: SecureChannel, mux: MuxConnection, task_group: TaskGroup) -> None:
        self.channel = channel
        self.mux = mux
        self.task_group = task_group
        self.rpc: RpcChannel | None = None
        self.rpc_lock = anyio.Lock()
        self.since = anyio.current_time()


class Peer:
    """A node this swarm has a direct link to."""

    def __init__(self, public_key: PublicKey, *, rpc_handlers: Mapping[str, RpcHandler]) -> None:
        self._public_key = public_key
        self._rpc_handlers = rpc_handlers
        self._connection: _Connection | None = None
        self._srtt: float | None = None

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else "disconnected"
        return f"<Peer {self._public_key.short} {state}>"

    @property
    def public_key(self) -> PublicKey:
        """The peer's identity, proven during the handshake."""
        return self._public_key

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds (EWMA of pings), None before the first."""
        return self._srtt

    @property
    def is_connected(self) -> bool:
        """Whether the link is up."""
        return self._connection is not None and not self._connection.mux.is_closed

    @property
    def connected_at(self) -> float | None:
        """When the current link came up (``anyio.current_time()`` clock), None when down."""
        return self._connection.since if self._connection is not None else None

    @property
    def remote_address(self) -> str | None:
        """The peer's transport address on this link, when known."""
        if self._connection is None:
            return None
        return self._connection.channel.extra(LinkAttribute.remote_address, None)

    async def ping(self, timeout: float = 10.0) -> float:
        """Measure one round trip to the peer, in seconds; updates `rtt`.

        Raises:
            crdtswarm.errors.RpcTimeoutError: no answer within ``timeout``.
            anyio.BrokenResourceError: the link is down.
        """
        start = anyio.current_time()  # the event loop's clock: simulated time in a simulation
        await self.rpc(PING_METHOD, b"", timeout=timeout)
        sample = anyio.current_time() - start
        self._srtt = (
            sample if self._srtt is None else self._srtt + _RTT_GAIN * (sample - self._srtt)
        )
        return sample

    async def rpc(self, method: str, payload: bytes = b"", *, timeout: float = 10.0) -> bytes:
        """Call ``method`` on the peer (see `Swarm.handle_rpc`) and return its answer.

        Raises:
            crdtswarm.errors.RpcTimeoutError: no answer within ``timeout`` seconds.
            crdtswarm.errors.RpcError: the peer answered with an error.
            anyio.BrokenResourceError: the link is down.
        """
        channel = await self._rpc_channel()
        return await channel.call(method, payload, timeout=timeout)

    async def open_stream(self, protocol: str) -> MuxStream:
        """Open an application stream for ``protocol`` (see `Swarm.handle`).

        Raises:
            anyio.BrokenResourceError: the link is down.
            ValueError: the protocol name is empty or longer than 59 bytes.
        """
        if not protocol:
            raise ValueError("the protocol name must not be empty")
        return await self._require().mux.open_stream(APP_PREFIX + protocol)

    async def aclose(
        self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "closed by the application"
    ) -> None:
        """Close the link gracefully, telling the peer ``code`` and ``message``."""
        if self._connection is not None:
            await self._connection.mux.aclose(code, message)

    def statistics(self) -> PeerStatistics:
        """A snapshot of the link's figures."""
        conn = self._require()
        mux = conn.mux.statistics()
        return PeerStatistics(
            rtt=self._srtt,
            transport=conn.channel.extra(LinkAttribute.transport, "?"),
            remote_address=self.remote_address,
            open_streams=mux.open_streams,
            bytes_sent=mux.bytes_sent,
            bytes_received=mux.bytes_received,
            is_initiator=conn.channel.is_initiator,
        )

    # -- managed by the swarm ------------------------------------------------------

    @property
    def _is_preferred_link(self) -> bool:
        conn = self._connection
        if conn is None or conn.mux.is_closed:
            return False
        return _is_preferred(conn.channel)

    def _attach(self, connection: _Connection) -> _Connection | None:
        old, self._connection = self._connection, connection
        return old

    def _detach(self, connection: _Connection) -> bool:
        if self._connection is connection:
            self._connection = None
            return True
        return False

    def _require(self) -> _Connection:
        conn = self._connection
        if conn is None or conn.mux.is_closed:
            raise anyio.BrokenResourceError(f"not linked to {self._public_key.short}")
        return conn

    async def _rpc_channel(self) -> RpcChannel:
        conn = self._require()
        if conn.rpc is None:
            async with conn.rpc_lock:
                if conn.rpc is None:
                    stream = await conn.mux.open_stream(PROTOCOL)
                    channel = RpcChannel(
                        stream,
                        remote_key=self._public_key,
                        handlers=self._rpc_handlers,
                        task_group=conn.task_group,
                    )
                    conn.task_group.start_soon(channel.serve)
                    conn.rpc = channel
        return conn.rpc


def _is_preferred(channel: SecureChannel) -> bool:
    """The rule both ends compute for duplicate links: keep the one the smaller key dialled."""
    local_is_smaller = channel.local_key < channel.remote_key
    return channel.is_initiator == local_is_smaller
