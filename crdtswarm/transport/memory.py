"""The in-process transport: nodes of one `MemoryNetwork` reach each other by public key.

A `MemoryNetwork` stands for the whole network. Each node gets its own
`MemoryTransport` (``network.transport()``); once the node serves under its public
key, others dial it by that key (or by its address ``"mem://<key>"``). A connection
is two one-way pipes, each a bounded queue of ``(delivery time, message)``; a link
end sends into one and receives from the other. There are no background tasks: the
sender stamps each message with its delivery time (one-way latency plus seeded
jitter, never earlier than the message before it), and the receiver sleeps until
that time before taking it.

Rules that hold for every pipe:

* Rule 1: a pipe holds at most ``capacity`` messages, delivered or still in flight;
  a sender waits (back-pressure) until the receiver takes one.
* Rule 2: messages come out in the order they went in, each no earlier than its
  delivery time. A cancelled ``receive`` takes nothing; a cancelled ``send`` sends
  nothing.
* Rule 3: the writer's end of a pipe is finished at most once: by ``send_eof`` or
  ``aclose`` (the reader gets ``EndOfStream`` once it has every message) or by an
  abortive close, ``aclose`` in a cancelled scope as ``anyio.aclose_forcefully``
  does (the reader gets every message, then ``BrokenResourceError``).
* Rule 4: when the network breaks a path (`MemoryNetwork.block`, ``partition``),
  both pipes of every connection on it drop their messages and both ends raise
  ``BrokenResourceError`` at once.

Everything random comes from ``random.Random`` instances seeded from the network's
seed (one per pipe, so a pipe's jitter does not depend on what other pipes do):
a run is reproducible given the seed and the order of events.
"""

from __future__ import annotations

import errno
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Any, ClassVar, Final

import anyio
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint, checkpoint_if_cancelled

from crdtswarm.errors import ConnectError
from crdtswarm.identity import InvalidKeyError, PublicKey
from crdtswarm.transport.abc import Link, LinkAttribute, LinkHandler, Transport, check_message_size

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "LinkStatistics",
    "MemoryLink",
    "MemoryNetwork",
    "MemoryTransport",
    "NetworkStatistics",
    "Tap",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE: Final = 1 << 20
"""Default largest message on a memory link: 1 MiB."""
DEFAULT_CAPACITY: Final = 64
"""Default number of messages one direction of a memory link holds before ``send`` waits."""

Tap = Callable[[PublicKey, PublicKey, bytes], None]
"""A function called as ``tap(src_key, dst_key, message)`` for every message sent."""

_SCHEME: Final = "mem"
_PREFIX: Final = "mem://"


def _address(key: PublicKey) -> str:
    return f"{_PREFIX}{key}"


def _parse_address(address: str) -> PublicKey:
    if not isinstance(address, str) or not address.startswith(_PREFIX):
        raise ValueError(f"not a memory address (mem://<public key>): {address!r}")
    try:
        return PublicKey.parse(address[len(_PREFIX) :])
    except InvalidKeyError as exc:
        raise ValueError(f"bad memory address {address!r}: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStatistics:
    """Counters of one memory link end, from `MemoryLink.statistics`."""

    messages_sent: int
    """Messages this end has sent."""
    bytes_sent: int
    """Payload bytes this end has sent."""
    messages_received: int
    """Messages this end has received."""
    bytes_received: int
    """Payload bytes this end has received."""
    messages_queued: int
    """Messages sent to this end that it has not received yet (in flight or waiting)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkStatistics:
    """Counters of a whole memory network, from `MemoryNetwork.statistics`."""

    nodes: int
    """Transports serving right now."""
    links_opened: int
    """Connections made since the network was created."""
    links_open: int
    """Connections with at least one end still open and not broken."""
    dials_refused: int
    """Dials that failed with ``ConnectError``."""
    messages: int
    """Messages carried, over every link, in both directions."""
    bytes: int
    """Payload bytes carried, over every link, in both directions."""


class _Pipe:
    """One direction of a connection: a bounded queue of ``(delivery time, message)``."""

    __slots__ = (
        "abort_cause",
        "broken",
        "capacity",
        "dst",
        "end_at",
        "last_delivery",
        "pair",
        "queue",
        "reader_closed",
        "rng",
        "src",
        "waiter",
    )

    def __init__(self, src: PublicKey, dst: PublicKey, capacity: int, rng: Random) -> None:
        self.src = src
        self.dst = dst
        self.pair = frozenset((src, dst))
        self.capacity = capacity
        self.rng = rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.last_delivery = -math.inf
        self.end_at: float | None = None  # writer finished; the reader sees it at this time
        self.abort_cause: BaseException | None = None  # writer finished abortively
        self.broken: BaseException | None = None  # the network broke the path
        self.reader_closed = False
        self.waiter: anyio.Event | None = None

    async def wait(self) -> None:
        """Wait until `notify` (the caller re-checks its condition afterwards)."""
        if self.waiter is None:
            self.waiter = anyio.Event()
        await self.waiter.wait()

    def notify(self) -> None:
        """Wake every task waiting on this pipe: its state changed."""
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None

    def break_(self, cause: BaseException) -> None:
        if self.broken is None:
            self.broken = cause
        self.queue.clear()
        self.notify()


class _Connection:
    """Both pipes of a connection between ``a`` (the dialler) and ``b``."""

    __slots__ = ("a_to_b", "b_to_a", "network", "open_ends", "pair")

    def __init__(self, network: MemoryNetwork, a: PublicKey, b: PublicKey, serial: int) -> None:
        self.network = network
        self.pair = frozenset((a, b))
        capacity = network.capacity
        self.a_to_b = _Pipe(a, b, capacity, network._derived_random(f"{a}>{b}#{serial}"))
        self.b_to_a = _Pipe(b, a, capacity, network._derived_random(f"{b}>{a}#{serial}"))
        self.open_ends = 2

    def end_closed(self) -> None:
        self.open_ends -= 1
        if self.open_ends == 0:
            self.network._forget(self)

    def break_(self, cause: BaseException) -> None:
        self.a_to_b.break_(cause)
        self.b_to_a.break_(cause)
        self.network._forget(self)


class MemoryLink(Link):
    """One end of a connection on a `MemoryNetwork`.

    Made by `MemoryTransport.dial` (and handed to the serving side's handler); see the
    module docstring for the rules it follows. Several tasks may send (or receive) at
    once; each message is delivered whole.
    """

    def __init__(
        self,
        connection: _Connection,
        outgoing: _Pipe,
        incoming: _Pipe,
        *,
        max_message_size: int,
        on_close: Callable[[MemoryLink], None] | None = None,
    ) -> None:
        self._connection = connection
        self._out = outgoing
        self._in = incoming
        self._max_message_size = max_message_size
        self._on_close = on_close
        self._closed = False
        self._eof_sent = False
        self._messages_sent = 0
        self._bytes_sent = 0
        self._messages_received = 0
        self._bytes_received = 0

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes, that `send` accepts."""
        return self._max_message_size

    @property
    def local_key(self) -> PublicKey:
        """The public key of the node at this end."""
        return self._out.src

    @property
    def remote_key(self) -> PublicKey:
        """The public key of the node at the other end."""
        return self._out.dst

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """`LinkAttribute` values: scheme ``"mem"`` and ``"mem://<key>"`` addresses."""
        local = _address(self.local_key)
        remote = _address(self.remote_key)
        return {
            LinkAttribute.transport: lambda: _SCHEME,
            LinkAttribute.local_address: lambda: local,
            LinkAttribute.remote_address: lambda: remote,
        }

    def statistics(self) -> LinkStatistics:
        """This end's message and byte counters."""
        return LinkStatistics(
            messages_sent=self._messages_sent,
            bytes_sent=self._bytes_sent,
            messages_received=self._messages_received,
            bytes_received=self._bytes_received,
            messages_queued=len(self._in.queue),
        )

    def _check_send(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._eof_sent:
            raise anyio.ClosedResourceError("this side already sent EOF")
        if self._out.broken is not None:
            raise anyio.BrokenResourceError from self._out.broken
        if self._out.reader_closed:
            raise anyio.BrokenResourceError from ConnectionResetError(
                errno.ECONNRESET, "the peer closed the link"
            )

    async def send(self, item: bytes) -> None:
        """Send one message; waits while the peer's queue is full.

        Raises:
            ValueError: if ``item`` is longer than `max_message_size` (nothing is sent).
            anyio.ClosedResourceError: if this end was closed or sent EOF.
            anyio.BrokenResourceError: if the peer closed its end or the network broke.
        """
        await checkpoint_if_cancelled()
        self._check_send()
        check_message_size(len(item), self._max_message_size)
        data = bytes(item)  # no copy for bytes; a snapshot of anything mutable
        pipe = self._out
        waited = False
        while len(pipe.queue) >= pipe.capacity:
            waited = True
            await pipe.wait()
            self._check_send()
        self._connection.network._carry(pipe, data)
        self._messages_sent += 1
        self._bytes_sent += len(data)
        if not waited:
            await cancel_shielded_checkpoint()

    async def receive(self) -> bytes:
        """Receive the next message, waiting for its delivery time.

        Raises:
            anyio.EndOfStream: once the peer sent EOF (or closed) and every message it sent
                has been received.
            anyio.ClosedResourceError: if this end was closed.
            anyio.BrokenResourceError: if the network broke the link, or the peer aborted
                it and every message it sent has been received.
        """
        await checkpoint()
        pipe = self._in
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if pipe.broken is not None:
                raise anyio.BrokenResourceError from pipe.broken
            if pipe.queue:
                due = pipe.queue[0][0]
            elif pipe.end_at is not None:
                due = pipe.end_at
            else:
                await pipe.wait()
                continue
            if due > anyio.current_time():
                # Sleep until `due`, but wake early if the pipe changes (a break, a close).
                with anyio.CancelScope(deadline=due):
                    await pipe.wait()
                continue
            if not pipe.queue:
                if pipe.abort_cause is not None:
                    raise anyio.BrokenResourceError from pipe.abort_cause
                raise anyio.EndOfStream
            _, data = pipe.queue.popleft()
            pipe.notify()
            self._messages_received += 1
            self._bytes_received += len(data)
            return data

    def _finish_sending(self, *, abort: bool) -> None:
        pipe = self._out
        if pipe.end_at is not None:
            return
        pipe.end_at = self._connection.network._end_time(pipe)
        if abort:
            pipe.abort_cause = ConnectionAbortedError(
                errno.ECONNABORTED, "the peer aborted the link"
            )
        pipe.notify()

    async def send_eof(self) -> None:
        """Finish the sending direction: the peer gets EOF after every message sent so far.

        Receiving still works. Later sends raise ``anyio.ClosedResourceError``.

        Raises:
            anyio.ClosedResourceError: if this end was closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        self._eof_sent = True
        self._finish_sending(abort=False)
        await checkpoint()

    def abort(self) -> None:
        """Close this end abortively: the peer gets what was sent, then ``BrokenResourceError``.

        This is what `aclose` does when called in a cancelled scope (as
        ``anyio.aclose_forcefully`` does).
        """
        self._close(abort=True)

    def _close(self, *, abort: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._finish_sending(abort=abort)
        incoming = self._in
        incoming.reader_closed = True
        incoming.queue.clear()
        incoming.notify()
        self._connection.end_closed()
        if self._on_close is not None:
            self._on_close(self)

    async def aclose(self) -> None:
        """Close this end: the peer gets every message sent so far, then EOF.

        Called in a cancelled scope (``anyio.aclose_forcefully``), the close is abortive:
        the peer gets ``BrokenResourceError`` instead of ``EndOfStream``. Tasks of ours
        still using this end get ``anyio.ClosedResourceError``; the peer's sends get
        ``anyio.BrokenResourceError``.
        """
        self._close(abort=anyio.current_effective_deadline() == -math.inf)
        await checkpoint()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoryLink {self.local_key.short}->{self.remote_key.short} {state}>"


class MemoryTransport(Transport):
    """One node's transport on a `MemoryNetwork`; create it with `MemoryNetwork.transport`.

    Args:
        network: the network the node lives on.
        max_message_size: the largest message, in bytes, its links accept (the
            network's default when None). A link between two transports takes the
            smaller of their limits.
    """

    scheme: ClassVar[str] = _SCHEME

    def __init__(self, network: MemoryNetwork, *, max_message_size: int | None = None) -> None:
        if max_message_size is not None and max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, not {max_message_size}")
        self._network = network
        self._max_message_size = (
            network.max_message_size if max_message_size is None else max_message_size
        )
        self._local_key: PublicKey | None = None
        self._handler: LinkHandler | None = None
        self._task_group: TaskGroup | None = None
        self._accepted: set[MemoryLink] = set()

    @property
    def network(self) -> MemoryNetwork:
        """The network this transport is on."""
        return self._network

    @property
    def max_message_size(self) -> int:
        """The largest message, in bytes, this transport's links accept."""
        return self._max_message_size

    @property
    def local_key(self) -> PublicKey | None:
        """The key this transport serves under, or None when it is not serving."""
        return self._local_key

    @property
    def addresses(self) -> list[str]:
        """``["mem://<key>"]`` while serving, else empty."""
        return [] if self._local_key is None else [_address(self._local_key)]

    def can_dial(self, address: str | None) -> bool:
        """Whether ``address`` is a memory address; True for None (dial by key)."""
        return address is None or (isinstance(address, str) and address.startswith(_PREFIX))

    async def serve(
        self,
        local_key: PublicKey,
        handler: LinkHandler,
        *,
        task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve under ``local_key`` until cancelled; see `Transport.serve`.

        On exit, every link this transport accepted and that is still open is closed
        abortively, as when a node dies.

        Raises:
            OSError: if another transport on the network already serves ``local_key``.
            RuntimeError: if this transport is already serving.
        """
        if self._local_key is not None:
            raise RuntimeError("this transport is already serving")
        self._network._register(local_key, self)
        try:
            async with anyio.create_task_group() as task_group:
                self._local_key = local_key
                self._handler = handler
                self._task_group = task_group
                try:
                    task_status.started([_address(local_key)])
                    await anyio.sleep_forever()
                finally:
                    self._task_group = None
                    for link in list(self._accepted):
                        link.abort()
                    task_group.cancel_scope.cancel()
        finally:
            self._network._unregister(local_key, self)
            self._local_key = None
            self._handler = None

    async def dial(self, remote_key: PublicKey, address: str | None = None) -> MemoryLink:
        """Open a link to ``remote_key`` (or to the node named by ``address``).

        Takes one round trip of simulated latency.

        Raises:
            crdtswarm.errors.ConnectError: if the node is not serving or the path is blocked.
            ValueError: if ``address`` is not a ``mem://`` address.
            RuntimeError: if this transport is not serving.
        """
        target = remote_key if address is None else _parse_address(address)
        if self._local_key is None:
            raise RuntimeError("serve() must have started before dial()")
        await checkpoint()
        return await self._network._connect(self, self._local_key, target)

    def _accept(self, link: MemoryLink) -> None:
        assert self._task_group is not None  # checked by MemoryNetwork._listener
        self._accepted.add(link)
        self._task_group.start_soon(self._run_handler, link, name=f"memory link {link!r}")

    def _forget_accepted(self, link: MemoryLink) -> None:
        self._accepted.discard(link)

    async def _run_handler(self, link: MemoryLink) -> None:
        assert self._handler is not None
        try:
            await self._handler(link)
        except Exception:
            logger.exception("link handler failed on %r", link)
            link.abort()


class MemoryNetwork:
    """An in-process network: nodes reach each other by public key, with simulated paths.

    Args:
        seed: seeds every random choice (jitter); the same seed and the same sequence of
            events give the same run.
        latency: default one-way latency between two nodes, in seconds (default 0.0).
        jitter: default extra one-way delay, uniform in ``[0, jitter)`` seconds per
            message (default 0.0); messages still arrive in order.
        capacity: messages one direction of a link holds before ``send`` waits (default 64).
        max_message_size: default largest message in bytes (default 1 MiB).

    Raises:
        ValueError: on a negative latency, jitter or size, or a capacity below 1.
    """

    def __init__(
        self,
        seed: int | str | bytes = 0,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        capacity: int = DEFAULT_CAPACITY,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        _check_delay("latency", latency)
        _check_delay("jitter", jitter)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        if max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, not {max_message_size}")
        self._seed = seed
        self._random = Random(seed)
        self._default_path = (float(latency), float(jitter))
        self._capacity = capacity
        self._max_message_size = max_message_size
        self._paths: dict[frozenset[PublicKey], tuple[float, float]] = {}
        self._blocked: set[frozenset[PublicKey]] = set()
        self._listeners: dict[PublicKey, MemoryTransport] = {}
        self._connections: dict[frozenset[PublicKey], set[_Connection]] = {}
        self._serials: dict[frozenset[PublicKey], int] = {}
        self._taps: list[Tap] = []
        self._links_opened = 0
        self._dials_refused = 0
        self._messages = 0
        self._bytes = 0

    @property
    def seed(self) -> int | str | bytes:
        """The seed this network was created with."""
        return self._seed

    @property
    def random(self) -> Random:
        """A ``random.Random`` seeded with `seed`, for simulations built on this network.

        The network's own jitter uses separate generators derived from the seed, so
        drawing from this one does not change the network's behaviour.
        """
        return self._random

    @property
    def capacity(self) -> int:
        """Messages one direction of a link holds before ``send`` waits."""
        return self._capacity

    @property
    def max_message_size(self) -> int:
        """Default largest message, in bytes, for transports of this network."""
        return self._max_message_size

    @property
    def nodes(self) -> frozenset[PublicKey]:
        """The keys of the nodes serving right now."""
        return frozenset(self._listeners)

    def transport(self, *, max_message_size: int | None = None) -> MemoryTransport:
        """A fresh transport for one node of this network."""
        return MemoryTransport(self, max_message_size=max_message_size)

    # -- paths ------------------------------------------------------------------------

    def set_latency(
        self, a: PublicKey, b: PublicKey, latency: float, *, jitter: float | None = None
    ) -> None:
        """Set the one-way latency between ``a`` and ``b`` (both directions), in seconds.

        Applies to messages sent from now on, on existing links too.

        Args:
            a: one node.
            b: the other node.
            latency: one-way delay in seconds.
            jitter: extra delay per message, uniform in ``[0, jitter)`` seconds; None keeps
                the path's current jitter.

        Raises:
            ValueError: if ``latency`` or ``jitter`` is negative or not finite.
        """
        _check_delay("latency", latency)
        pair = frozenset((a, b))
        if jitter is None:
            jitter = self._paths.get(pair, self._default_path)[1]
        _check_delay("jitter", jitter)
        self._paths[pair] = (float(latency), float(jitter))

    def latency(self, a: PublicKey, b: PublicKey) -> float:
        """The one-way latency between ``a`` and ``b``, in seconds, without jitter."""
        return self._paths.get(frozenset((a, b)), self._default_path)[0]

    def block(self, a: PublicKey, b: PublicKey) -> None:
        """Cut the direct path between ``a`` and ``b``.

        Dials between them fail with ``ConnectError`` and every link between them breaks
        now: both ends raise ``anyio.BrokenResourceError``, messages in flight are lost.
        """
        pair = frozenset((a, b))
        self._blocked.add(pair)
        cause = ConnectionResetError(
            errno.ECONNRESET,
            f"simulated network: path {a.short}<->{b.short} blocked",
        )
        for connection in list(self._connections.get(pair, ())):
            connection.break_(cause)

    def unblock(self, a: PublicKey, b: PublicKey) -> None:
        """Restore the direct path between ``a`` and ``b`` (links already broken stay broken)."""
        self._blocked.discard(frozenset((a, b)))

    def is_blocked(self, a: PublicKey, b: PublicKey) -> bool:
        """Whether the direct path between ``a`` and ``b`` is cut."""
        return frozenset((a, b)) in self._blocked

    def partition(self, *groups: Iterable[PublicKey]) -> None:
        """Block every path between nodes of different groups (see `block`).

        ``partition([a, b], [c])`` cuts a-c and b-c and leaves a-b alone.
        """
        sets = [frozenset(group) for group in groups]
        for i, left in enumerate(sets):
            for right in sets[i + 1 :]:
                for a in left:
                    for b in right:
                        if a != b:
                            self.block(a, b)

    def heal(self) -> None:
        """Unblock every path (links already broken stay broken)."""
        self._blocked.clear()

    # -- observation ------------------------------------------------------------------

    def tap(self, fn: Tap) -> Callable[[], None]:
        """Call ``fn(src_key, dst_key, message)`` for every message sent on the network.

        ``fn`` runs inside ``send``, before the message is queued; an exception from it
        propagates to the sender and the message is not sent.

        Returns:
            A function that removes the tap.
        """
        self._taps.append(fn)

        def remove() -> None:
            if fn in self._taps:
                self._taps.remove(fn)

        return remove

    def statistics(self) -> NetworkStatistics:
        """Network-wide counters."""
        return NetworkStatistics(
            nodes=len(self._listeners),
            links_opened=self._links_opened,
            links_open=sum(len(c) for c in self._connections.values()),
            dials_refused=self._dials_refused,
            messages=self._messages,
            bytes=self._bytes,
        )

    # -- machinery used by transports and links ---------------------------------------

    def _derived_random(self, label: str) -> Random:
        # String seeds are hashed with SHA-512: stable across processes.
        return Random(f"crdtswarm.memory:{self._seed!r}:{label}")

    def _register(self, key: PublicKey, transport: MemoryTransport) -> None:
        if key in self._listeners:
            raise OSError(errno.EADDRINUSE, f"{_address(key)} is already served on this network")
        self._listeners[key] = transport

    def _unregister(self, key: PublicKey, transport: MemoryTransport) -> None:
        if self._listeners.get(key) is transport:
            del self._listeners[key]

    def _listener(self, src: PublicKey, dst: PublicKey) -> MemoryTransport:
        listener = self._listeners.get(dst)
        cause: OSError | None = None
        if listener is None or listener._task_group is None:
            cause = ConnectionRefusedError(
                errno.ECONNREFUSED, f"no node serves {_address(dst)} on this network"
            )
        elif frozenset((src, dst)) in self._blocked:
            cause = OSError(
                errno.EHOSTUNREACH, f"simulated network: path {src.short}<->{dst.short} blocked"
            )
        if cause is not None:
            self._dials_refused += 1
            raise ConnectError(f"cannot reach {dst.short}: {cause.strerror}") from cause
        assert listener is not None
        return listener

    async def _connect(
        self, dialler: MemoryTransport, src: PublicKey, dst: PublicKey
    ) -> MemoryLink:
        self._listener(src, dst)
        round_trip = 2 * self.latency(src, dst)
        if round_trip > 0:
            await anyio.sleep(round_trip)
        listener = self._listener(src, dst)  # the world may have changed meanwhile

        pair = frozenset((src, dst))
        serial = self._serials.get(pair, 0)
        self._serials[pair] = serial + 1
        connection = _Connection(self, src, dst, serial)
        self._connections.setdefault(pair, set()).add(connection)
        self._links_opened += 1
        size = min(dialler.max_message_size, listener.max_message_size)
        ours = MemoryLink(connection, connection.a_to_b, connection.b_to_a, max_message_size=size)
        theirs = MemoryLink(
            connection,
            connection.b_to_a,
            connection.a_to_b,
            max_message_size=size,
            on_close=listener._forget_accepted,
        )
        listener._accept(theirs)
        return ours

    def _forget(self, connection: _Connection) -> None:
        connections = self._connections.get(connection.pair)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._connections[connection.pair]

    def _path(self, pair: frozenset[PublicKey]) -> tuple[float, float]:
        return self._paths.get(pair, self._default_path)

    def _carry(self, pipe: _Pipe, data: bytes) -> None:
        for fn in self._taps:
            fn(pipe.src, pipe.dst, data)
        latency, jitter = self._path(pipe.pair)
        due = anyio.current_time() + latency
        if jitter > 0:
            due += pipe.rng.random() * jitter
        due = max(due, pipe.last_delivery)
        pipe.last_delivery = due
        pipe.queue.append((due, data))
        pipe.notify()
        self._messages += 1
        self._bytes += len(data)

    def _end_time(self, pipe: _Pipe) -> float:
        latency, _ = self._path(pipe.pair)
        return max(anyio.current_time() + latency, pipe.last_delivery)


def _check_delay(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
