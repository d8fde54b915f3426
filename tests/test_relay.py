"""Relayed circuits: the relay service and RelayTransport alone, then inside swarms."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup

from crdtswarm import (
    ConnectError,
    ErrorCode,
    Identity,
    IdentityMismatchError,
    PeerConnected,
    PeerDisconnected,
    PublicKey,
    Stream,
    StreamResetError,
    Swarm,
    SwarmConfig,
    SwarmEvent,
)
from crdtswarm.mux import MuxConnection, MuxStream
from crdtswarm.protocol.mux import MuxConfig
from crdtswarm.protocol.probe import ProbeConfig
from crdtswarm.protocol.relay import (
    PROTOCOL,
    CircuitRefused,
    CircuitSession,
    RefusalReason,
    RelayEvent,
)
from crdtswarm.relay import (
    RelayConfig,
    RelayLink,
    RelayRefusedError,
    RelayService,
    RelayTransport,
    fallback_relays,
    parse_relay_address,
    relay_address,
)
from crdtswarm.secure import establish
from crdtswarm.testing import SimulatedNetwork, wait_for_directory
from crdtswarm.transport.abc import Link, LinkAttribute, Transport
from crdtswarm.transport.memory import MemoryLink, MemoryNetwork

WAIT = 5.0
MARKER = b"PLAINTEXT-MARKER-123"
KEYS = [Identity(bytes([i + 40]) * 32).public_key for i in range(5)]


async def echo(stream: Stream, remote: PublicKey) -> None:
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            return
        await stream.send(data)


async def receive_all(link: Link) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(await link.receive())
        except anyio.EndOfStream:
            return out


# --- Addresses -----------------------------------------------------------------------


def test_relay_addresses_round_trip_and_reject_junk() -> None:
    s, r1, r2, t, _ = KEYS
    address = relay_address((r1, r2), t)
    assert address == f"relay://{r1}/{r2}/{t}"
    assert parse_relay_address(address) == ((r1, r2), t)
    for bad in [
        "tcp://127.0.0.1:1",
        f"relay://{t}",
        f"relay://{r1}/{r2}/{s}/{t}",
        f"relay://{r1}/{r1}/{t}",
        f"relay://{r1}/nonsense",
    ]:
        with pytest.raises(ValueError, match="relay"):
            parse_relay_address(bad)


def test_fallback_relays_prefer_peers_the_rows_link_to_the_target() -> None:
    target, near, far, blind, slow = KEYS
    peers = {near: 0.010, far: 0.001, blind: 0.001, slow: None, target: 0.0}
    rows = {near: {target: 0.005}, target: {far: 0.050}}
    assert fallback_relays(target, peers, rows) == [near, far, blind]
    assert fallback_relays(target, peers, rows, limit=9) == [near, far, blind, slow]
    assert fallback_relays(target, peers, rows, exclude=[near], limit=2) == [far, blind]
    assert fallback_relays(target, {}, rows) == []


def test_relay_config_rejects_nonsense() -> None:
    for bad in [
        {"max_circuits": -1},
        {"max_circuit_bytes": -1},
        {"max_circuit_rate": 0.0},
        {"max_buffer_size": 0},
        {"idle_timeout": 0.0},
    ]:
        with pytest.raises(ValueError, match="must be"):
            RelayConfig(**bad)  # type: ignore[arg-type]


# --- One relay, without swarms ----------------------------------------------------------
# S -- R -- T over memory links, each running a mux (no Noise: the relay layer alone).

WINDOW = 256 * 1024
MUX = MuxConfig(initial_window_size=WINDOW, max_window_size=WINDOW)


@dataclass
class Triangle:
    net: MemoryNetwork
    tg: TaskGroup
    relay_config: RelayConfig
    max_message_size: int = 100_000
    dial_timeout: float = 2.0
    muxes: dict[tuple[PublicKey, PublicKey], MuxConnection] = field(default_factory=dict)
    services: dict[PublicKey, RelayService] = field(default_factory=dict)
    transports: dict[PublicKey, RelayTransport] = field(default_factory=dict)
    linked: dict[tuple[PublicKey, PublicKey], anyio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.s, self.r, self.t = KEYS[:3]
        self.accepted_send, self.accepted = anyio.create_memory_object_stream[Link](16)

    async def start(self) -> None:
        memory = {key: self.net.transport() for key in (self.s, self.r, self.t)}
        for key, transport in memory.items():
            await self.tg.start(transport.serve, key, self._on_memory_link)
            relay = RelayTransport(
                self._opener(key),
                connect_timeout=self.dial_timeout,
                max_message_size=self.max_message_size,
            )
            handler = self._on_relayed_link if key == self.t else self._refuse_link
            await self.tg.start(relay.serve, key, handler)
            self.transports[key] = relay
            config = self.relay_config if key == self.r else RelayConfig(enabled=False)
            self.services[key] = RelayService(
                key, open_stream=self._opener(key), transport=relay, config=config
            )
        for a, b in [(self.s, self.r), (self.r, self.t)]:
            self.linked[b, a] = anyio.Event()
            link = await memory[a].dial(b)
            await self.tg.start(self._run_mux, link, a, b, True)
            await self.linked[b, a].wait()

    def _opener(self, me: PublicKey) -> Callable[[PublicKey], Any]:
        async def open_stream(key: PublicKey) -> MuxStream:
            mux = self.muxes.get((me, key))
            if mux is None or mux.is_closed:
                raise ConnectError(f"{me.short} has no link to {key.short}")
            return await mux.open_stream(PROTOCOL)

        return open_stream

    async def _on_memory_link(self, link: MemoryLink) -> None:
        await self._run_mux(link, link.local_key, link.remote_key, False)

    async def _run_mux(
        self,
        link: MemoryLink,
        me: PublicKey,
        peer: PublicKey,
        initiator: bool,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        def accept(protocol: str) -> Any:
            if protocol != PROTOCOL:
                return None
            return lambda stream: self.services[me].handle_stream(stream, peer)

        async with MuxConnection(link, is_initiator=initiator, accept=accept, config=MUX) as mux:
            self.muxes[me, peer] = mux
            if (me, peer) in self.linked:
                self.linked[me, peer].set()
            task_status.started()
            await mux.wait_closed()

    async def _on_relayed_link(self, link: Link) -> None:
        await self.accepted_send.send(link)

    async def _refuse_link(self, link: Link) -> None:
        await link.aclose()

    async def connect(self) -> tuple[RelayLink, RelayLink]:
        with anyio.fail_after(WAIT):
            ours = await self.transports[self.s].dial(self.t, relay_address((self.r,), self.t))
            theirs = await self.accepted.receive()
        assert isinstance(theirs, RelayLink)
        return ours, theirs

    def kill_relay(self) -> None:
        self.net.block(self.s, self.r)
        self.net.block(self.r, self.t)


@contextlib.asynccontextmanager
async def triangle(dial_timeout: float = 2.0, **config: Any) -> AsyncIterator[Triangle]:
    async with anyio.create_task_group() as tg:
        net = MemoryNetwork(seed=3)
        tri = Triangle(net, tg, RelayConfig(**config), dial_timeout=dial_timeout)
        with tri.accepted_send, tri.accepted:
            await tri.start()
            yield tri
            for mux in tri.muxes.values():  # gracefully: a cancelled mux waits for its writer
                await mux.aclose()
            tg.cancel_scope.cancel()


async def test_a_circuit_carries_framed_messages_both_ways() -> None:
    async with triangle() as tri:
        a, b = await tri.connect()
        sizes = [0, 1, 2, 1000, 65_536, 99_999, 0, 7]
        messages = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:

                async def sender(link: Link) -> None:
                    for message in messages:
                        await link.send(message)
                    await link.send_eof()

                tg.start_soon(sender, a)
                tg.start_soon(sender, b)
                assert await receive_all(b) == messages
                assert await receive_all(a) == messages
        stats = tri.services[tri.r].statistics()
        assert stats.circuits_opened == 1
        assert stats.bytes_relayed >= 2 * sum(sizes)


async def test_relayed_link_size_limit_attributes_and_close() -> None:
    async with triangle() as tri:
        a, b = await tri.connect()
        assert a.max_message_size == b.max_message_size == tri.max_message_size
        with pytest.raises(ValueError, match="max_message_size"):
            await a.send(bytes(tri.max_message_size + 1))
        assert a.extra(LinkAttribute.transport) == "relay"
        assert a.extra(LinkAttribute.remote_address) == relay_address((tri.r,), tri.t)
        assert b.extra(LinkAttribute.remote_address) == relay_address((tri.r,), tri.s)
        assert a.extra(LinkAttribute.local_address) == b.extra(LinkAttribute.remote_address)
        assert b.remote_key == tri.s
        assert b.relays == (tri.r,)
        with anyio.move_on_after(0.05):
            await b.receive()  # a cancelled receive takes nothing
        await a.send(b"kept")
        assert await b.receive() == b"kept"
        with anyio.fail_after(WAIT):
            await a.send(b"last")
            await a.aclose()
            assert await receive_all(b) == [b"last"]
        with pytest.raises(anyio.ClosedResourceError):
            await a.send(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            await a.receive()


async def test_concurrent_senders_never_interleave_frames() -> None:
    async with triangle() as tri:
        a, b = await tri.connect()

        async def sender(n: int) -> None:
            for i in range(20):
                await a.send(struct.pack(">II", n, i) + bytes([n]) * (7000 * n))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for n in range(4):
                    tg.start_soon(sender, n)
                seen: dict[int, list[int]] = {n: [] for n in range(4)}
                for _ in range(80):
                    message = await b.receive()
                    n, i = struct.unpack_from(">II", message)
                    assert message[8:] == bytes([n]) * (7000 * n)
                    seen[n].append(i)
        assert seen == {n: list(range(20)) for n in range(4)}


async def test_the_relay_holds_a_bounded_amount_when_the_target_does_not_read() -> None:
    async with triangle(max_buffer_size=16 * 1024, max_circuit_rate=None) as tri:
        a, _ = await tri.connect()
        sent = 0
        with anyio.fail_after(WAIT):
            while True:
                with anyio.move_on_after(0.2) as scope:
                    await a.send(bytes(16 * 1024))
                if scope.cancelled_caught:
                    break
                sent += 1
                assert sent < 200, "the sender never blocked"
        relayed = tri.services[tri.r].statistics().bytes_relayed
        # the relay forwarded at most the target's window; it holds one read besides
        assert relayed <= WINDOW + 16 * 1024
        assert sent * 16 * 1024 <= relayed + WINDOW + 2 * 16 * 1024


async def test_a_dying_relay_breaks_both_ends_of_the_circuit() -> None:
    async with triangle() as tri:
        a, b = await tri.connect()
        await a.send(b"hello")
        assert await b.receive() == b"hello"
        outcome: list[type[BaseException]] = []

        async def receiver(link: Link, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            with pytest.raises(anyio.BrokenResourceError) as info:
                await link.receive()
            outcome.append(type(info.value.__cause__ or info.value))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                await tg.start(receiver, a)
                await tg.start(receiver, b)
                await anyio.wait_all_tasks_blocked()
                tri.kill_relay()
        assert len(outcome) == 2
        with pytest.raises(anyio.BrokenResourceError):
            await a.send(b"anyone?")


async def test_a_reset_on_one_side_resets_the_other_with_its_code() -> None:
    async with triangle() as tri:
        a, b = await tri.connect()
        with anyio.fail_after(WAIT):
            await anyio.aclose_forcefully(a)  # abortive: the circuit is reset
            with pytest.raises(anyio.BrokenResourceError) as info:
                await b.receive()
        assert isinstance(info.value.__cause__, StreamResetError)


async def test_the_idle_timer_resets_a_quiet_circuit() -> None:
    async with triangle(idle_timeout=0.2) as tri:
        start = anyio.current_time()
        _, b = await tri.connect()
        with anyio.fail_after(WAIT), pytest.raises(anyio.BrokenResourceError) as info:
            await b.receive()
        assert anyio.current_time() - start >= 0.2
        assert "idle" in str(info.value.__cause__)
        assert tri.services[tri.r].statistics().circuits == 0


async def test_the_byte_limit_resets_the_circuit() -> None:
    async with triangle(max_circuit_bytes=50_000) as tri:
        a, b = await tri.connect()
        await a.send(bytes(40_000))
        assert len(await b.receive()) == 40_000
        await a.send(bytes(40_000))  # goes out: the relay counts the bytes as they pass
        with anyio.fail_after(WAIT), pytest.raises(anyio.BrokenResourceError) as info:
            await b.receive()
        assert "byte limit" in str(info.value.__cause__)


async def test_the_rate_limit_spaces_the_bytes_out() -> None:
    rate, burst = 200_000.0, 20_000
    async with triangle(max_circuit_rate=rate, rate_burst_size=burst) as tri:
        a, b = await tri.connect()
        total = 99_000
        start = anyio.current_time()
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, bytes(total))
                assert len(await b.receive()) == total
        elapsed = anyio.current_time() - start
        assert elapsed >= (total - burst) / rate * 0.9


async def test_refusals_reach_the_dialler_with_a_reason() -> None:
    async with triangle(enabled=False) as tri:
        with pytest.raises(ConnectError) as info:
            await tri.connect()
        cause = info.value.__cause__
        assert isinstance(cause, RelayRefusedError)
        assert cause.reason is RefusalReason.DISABLED
        assert cause.relay == tri.r
        assert tri.services[tri.r].statistics().circuits_refused == 1
    async with triangle() as tri:
        unknown = KEYS[4]  # not linked to the relay
        with pytest.raises(ConnectError) as info:
            await tri.transports[tri.s].dial(unknown, relay_address((tri.r,), unknown))
        assert isinstance(info.value.__cause__, RelayRefusedError)
        assert info.value.__cause__.reason is RefusalReason.NOT_LINKED
        with pytest.raises(ConnectError, match="no direct link"):  # the first hop must be ours
            await tri.transports[tri.s].dial(unknown, relay_address((tri.t,), unknown))


class SilentRelay:
    """Reads the request, then says nothing (or hangs up, with ``hang_up``)."""

    def __init__(self, *, hang_up: bool) -> None:
        self.hang_up = hang_up

    async def handle_stream(self, stream: MuxStream, remote_key: PublicKey) -> None:
        await stream.receive()
        if self.hang_up:
            await stream.reset(ErrorCode.INTERNAL_ERROR, "gone")
        else:
            await anyio.sleep_forever()


async def test_a_relay_that_does_not_answer_or_hangs_up() -> None:
    async with triangle(dial_timeout=0.2) as tri:
        tri.services[tri.r] = SilentRelay(hang_up=False)  # type: ignore[assignment]
        with anyio.fail_after(WAIT), pytest.raises(ConnectError, match="no answer") as info:
            await tri.connect()
        assert isinstance(info.value.__cause__, TimeoutError)
        tri.services[tri.r] = SilentRelay(hang_up=True)  # type: ignore[assignment]
        with anyio.fail_after(WAIT), pytest.raises(ConnectError, match="no answer") as info:
            await tri.connect()
        assert isinstance(info.value.__cause__, StreamResetError)


async def test_dial_arguments_are_checked() -> None:
    async with triangle() as tri:
        relay = tri.transports[tri.s]
        with pytest.raises(ValueError, match="needs an address"):
            await relay.dial(tri.t)
        with pytest.raises(ValueError, match="does not lead"):
            await relay.dial(tri.t, relay_address((tri.r,), KEYS[4]))
        with pytest.raises(ValueError, match="passes through this node"):
            await relay.dial(tri.t, relay_address((tri.s,), tri.t))
        assert relay.can_dial(relay_address((tri.r,), tri.t))
        assert not relay.can_dial(None)
    with pytest.raises(RuntimeError, match="serve"):
        await RelayTransport().dial(KEYS[1], relay_address((KEYS[2],), KEYS[1]))


async def test_circuit_limits_total_and_per_peer() -> None:
    async with triangle(max_circuits_per_peer=2) as tri:
        first = await tri.connect()
        await tri.connect()
        with pytest.raises(ConnectError) as info:
            await tri.connect()
        assert isinstance(info.value.__cause__, RelayRefusedError)
        assert info.value.__cause__.reason is RefusalReason.LIMIT
        assert "too many circuits" in info.value.__cause__.message
        for link in first:
            await link.aclose()
        with anyio.fail_after(WAIT):  # the closed circuit frees its place
            while tri.services[tri.r].statistics().circuits > 1:
                await anyio.wait_all_tasks_blocked()
        await tri.connect()
    async with triangle(max_circuits=1) as tri:
        await tri.connect()
        with pytest.raises(ConnectError, match="relay full"):
            await tri.connect()


async def test_a_request_that_never_comes_times_out() -> None:
    async with triangle(connect_timeout=0.2) as tri:
        stream = await tri.muxes[tri.s, tri.r].open_stream(PROTOCOL)
        with anyio.fail_after(WAIT), pytest.raises(StreamResetError, match="no relay request"):
            await stream.receive()
        stream = await tri.muxes[tri.s, tri.r].open_stream(PROTOCOL)
        await stream.send(b"\x01\x07")  # an unknown message type
        with anyio.fail_after(WAIT), pytest.raises(StreamResetError, match="unknown relay"):
            await stream.receive()


async def ask(stream: MuxStream, request: Callable[[CircuitSession], None]) -> RelayEvent:
    """Send one request on a relay substream by hand and return the answer."""
    session = CircuitSession(is_opener=True)
    request(session)
    await stream.send(session.data_to_send())
    with anyio.fail_after(WAIT):
        while (event := session.next_event()) is None:
            session.receive_data(await stream.receive())
    return event


async def test_paths_that_loop_or_lie_are_refused() -> None:
    async with triangle() as tri:
        s, r, t = tri.s, tri.r, tri.t
        to_relay = tri.muxes[s, r]
        for request in [
            lambda session: session.send_connect(r),  # the relay as target
            lambda session: session.send_connect(s),  # back to the source
            lambda session: session.send_connect(t, origin=(r,)),  # the relay before itself
            lambda session: session.send_connect(t, origin=(s,)),  # the sender before itself
        ]:
            answer = await ask(await to_relay.open_stream(PROTOCOL), request)
            assert isinstance(answer, CircuitRefused)
            assert answer.reason is RefusalReason.BAD_PATH
        to_target = tri.muxes[r, t]
        for origin in [(t,), (r,), (s, r)]:  # an origin naming the target or the relay
            answer = await ask(
                await to_target.open_stream(PROTOCOL),
                lambda session, origin=origin: session.send_incoming(origin),
            )
            assert isinstance(answer, CircuitRefused)
            assert answer.reason is RefusalReason.BAD_PATH
        # the target's own service, asked to relay, refuses: relaying is off there
        answer = await ask(
            await to_target.open_stream(PROTOCOL), lambda session: session.send_connect(s)
        )
        assert isinstance(answer, CircuitRefused)
        assert answer.reason is RefusalReason.DISABLED


# --- Swarms ----------------------------------------------------------------------------


def swarm_config(**relay: Any) -> SwarmConfig:
    return SwarmConfig(
        auto_mesh=False,
        link_publish_delay=0.01,
        link_publish_interval=0.01,
        relay=RelayConfig(**relay),
    )


async def next_event(events: AsyncIterator[SwarmEvent], kind: type) -> SwarmEvent:
    with anyio.fail_after(WAIT):
        async for event in events:
            if isinstance(event, kind):
                return event
    raise AssertionError("event stream ended")


async def wait_for_route(node: Swarm, key: PublicKey, hops: tuple[PublicKey, ...]) -> None:
    """Wait until ``node`` routes to ``key`` through ``hops`` (rows travel in the directory)."""
    await wait_until(node, lambda: node.route(key).hops == hops)


async def wait_until(node: Swarm, condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, checking it after each change of the directory."""
    await wait_for_directory(node, condition, timeout=WAIT)


async def link(a: Swarm, b: Swarm) -> None:
    """Link a to b and wait until both sides have the peer."""
    events = b.events()
    await a.call(b.public_key)
    if a.public_key not in b.peers:
        await next_event(events, PeerConnected)


async def test_a_stream_through_a_relay_carries_ciphertext_only() -> None:
    net = SimulatedNetwork(seed=1)
    seen: list[tuple[PublicKey, PublicKey, bytes]] = []
    net.tap(lambda src, dst, data: seen.append((src, dst, data)))
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(3)
        ]
        net.block(a.public_key, c.public_key)
        c.handle("echo", echo)
        await link(a, b)
        await link(c, b)
        await wait_for_route(a, c.public_key, (b.public_key,))
        a_events, c_events = a.events(), c.events()
        with anyio.fail_after(WAIT):
            stream = await a.open_stream(c.public_key, "echo")
            await stream.send(MARKER * 100)
            echoed = b""
            while len(echoed) < len(MARKER) * 100:
                echoed += await stream.receive()
        assert echoed == MARKER * 100
        assert (await next_event(a_events, PeerConnected)).public_key == c.public_key
        assert (await next_event(c_events, PeerConnected)).public_key == a.public_key
        assert a.peers[c.public_key].remote_address == relay_address((b.public_key,), c.public_key)
        assert c.peers[a.public_key].remote_address == relay_address((b.public_key,), a.public_key)
        assert a.peers[c.public_key].statistics().transport == "relay"
        relay_stats = b.statistics().relay
        assert relay_stats.circuits == relay_stats.circuits_opened == 1
        assert relay_stats.bytes_relayed > len(MARKER) * 200
    through_b = [data for src, dst, data in seen if b.public_key in (src, dst)]
    assert sum(map(len, through_b)) > len(MARKER) * 200  # the marker's bytes did pass B
    assert not any(MARKER in data for _, _, data in seen)  # but never in plaintext, anywhere
    assert not any(
        a.public_key in (src, dst) and c.public_key in (src, dst) for src, dst, _ in seen
    )


async def test_a_relay_is_found_before_the_rows_are_known() -> None:
    net = SimulatedNetwork(seed=2)
    config = dataclasses.replace(swarm_config(), link_publish_delay=60.0)  # no rows at all
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [
            await stack.enter_async_context(Swarm(transports=[net.transport()], config=config))
            for _ in range(3)
        ]
        net.block(a.public_key, c.public_key)
        c.handle("echo", echo)
        await link(a, b)
        await link(c, b)
        assert a.route(c.public_key).latency is None
        with anyio.fail_after(WAIT):
            stream = await a.open_stream(c.public_key, "echo")
            await stream.send(b"ping")
            assert await stream.receive() == b"ping"


async def test_relaying_disabled_refuses_with_connect_error() -> None:
    net = SimulatedNetwork(seed=3)
    async with (
        Swarm(transports=[net.transport()], config=swarm_config()) as a,
        Swarm(transports=[net.transport()], config=swarm_config(enabled=False)) as b,
        Swarm(transports=[net.transport()], config=swarm_config()) as c,
    ):
        net.block(a.public_key, c.public_key)
        await link(a, b)
        await link(c, b)
        with pytest.raises(ConnectError) as info:
            await a.call(c.public_key, relay_address((b.public_key,), c.public_key))
        refused = info.value.__cause__.__cause__  # the swarm's error wraps the transport's
        assert isinstance(refused, RelayRefusedError)
        assert refused.reason is RefusalReason.DISABLED
        with pytest.raises(ConnectError):
            await a.open_stream(c.public_key, "echo")
        assert b.statistics().relay.circuits_refused == 2
        assert c.public_key not in a.peers


async def test_circuits_per_peer_are_limited_in_a_swarm() -> None:
    net = SimulatedNetwork(seed=4)
    async with contextlib.AsyncExitStack() as stack:
        b = await stack.enter_async_context(
            Swarm(transports=[net.transport()], config=swarm_config(max_circuits_per_peer=1))
        )
        a, c, d = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(3)
        ]
        for node in (c, d):
            net.block(a.public_key, node.public_key)
            await link(node, b)
        await link(a, b)
        await a.call(c.public_key, relay_address((b.public_key,), c.public_key))
        with pytest.raises(ConnectError, match="too many circuits"):
            await a.call(d.public_key, relay_address((b.public_key,), d.public_key))
        await a.peers[c.public_key].aclose()
        with anyio.fail_after(WAIT):
            while b.statistics().relay.circuits:
                await anyio.wait_all_tasks_blocked()
        await a.call(d.public_key, relay_address((b.public_key,), d.public_key))


async def test_an_idle_relayed_link_is_reset_by_the_relay() -> None:
    net = SimulatedNetwork(seed=5)
    async with (
        Swarm(transports=[net.transport()], config=swarm_config()) as a,
        Swarm(transports=[net.transport()], config=swarm_config(idle_timeout=0.3)) as b,
        Swarm(transports=[net.transport()], config=swarm_config()) as c,
    ):
        net.block(a.public_key, c.public_key)
        await link(a, b)
        await link(c, b)
        events = a.events()
        await a.call(c.public_key, relay_address((b.public_key,), c.public_key))
        start = anyio.current_time()
        gone = await next_event(events, PeerDisconnected)  # keepalives come every 5 s only
        assert gone.public_key == c.public_key
        assert anyio.current_time() - start >= 0.3


async def test_a_path_of_two_relays() -> None:
    net = SimulatedNetwork(seed=6)
    async with contextlib.AsyncExitStack() as stack:
        a, b, d, c = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(4)
        ]
        for x, y in [(a, d), (a, c), (b, c)]:
            net.block(x.public_key, y.public_key)
        c.handle("echo", echo)
        await link(a, b)
        await link(b, d)
        await link(d, c)
        await wait_for_route(a, c.public_key, (b.public_key, d.public_key))
        with anyio.fail_after(WAIT):
            stream = await a.open_stream(c.public_key, "echo")
            await stream.send(MARKER)
            assert await stream.receive() == MARKER
        assert a.peers[c.public_key].remote_address == relay_address(
            (b.public_key, d.public_key), c.public_key
        )
        assert c.peers[a.public_key].remote_address == relay_address(
            (d.public_key, b.public_key), a.public_key
        )
        assert b.statistics().relay.circuits == d.statistics().relay.circuits == 1


@pytest.mark.parametrize("death", ["leaves", "crashes"])
async def test_when_the_relay_dies_streams_fail_and_the_next_stream_takes_another(
    death: str,
) -> None:
    net = SimulatedNetwork(seed=7)
    async with contextlib.AsyncExitStack() as stack:
        a, c, e = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(3)
        ]
        net.block(a.public_key, c.public_key)
        for node in (a, c):  # B will be the faster relay, by far
            net.set_latency(node.public_key, e.public_key, 0.030)
        c.handle("echo", echo)
        await link(a, e)
        await link(c, e)
        async with Swarm(transports=[net.transport()], config=swarm_config()) as b:
            await link(a, b)
            await link(c, b)
            await wait_for_route(a, c.public_key, (b.public_key,))
            stream = await a.open_stream(c.public_key, "echo")
            await stream.send(b"one")
            assert await stream.receive() == b"one"
            assert a.peers[c.public_key].remote_address.startswith(f"relay://{b.public_key}/")
            if death == "crashes":
                net.partition([b.public_key], [a.public_key, c.public_key, e.public_key])
        start = anyio.current_time()
        with anyio.fail_after(3), pytest.raises((anyio.BrokenResourceError, StreamResetError)):
            await stream.receive()
        assert anyio.current_time() - start < 3
        with anyio.fail_after(WAIT):
            again = await a.open_stream(c.public_key, "echo")
            await again.send(b"two")
            assert await again.receive() == b"two"
        assert a.peers[c.public_key].remote_address == relay_address((e.public_key,), c.public_key)


class ImpostorRelay:
    """A relay that answers CONNECT itself and runs the handshake as its own identity."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.attempts = 0

    async def handle_stream(self, stream: MuxStream, remote_key: PublicKey) -> None:
        self.attempts += 1
        session = CircuitSession(is_opener=False)
        while session.next_event() is None:
            session.receive_data(await stream.receive())
        session.accept()
        await stream.send(session.data_to_send())
        fake = RelayLink(
            stream,
            local_key=self.identity.public_key,
            remote_key=remote_key,
            relays=(self.identity.public_key,),
            max_message_size=1 << 20,
        )
        with contextlib.suppress(Exception):
            await establish(fake, self.identity, initiator=False, timeout=WAIT)


async def test_a_relay_cannot_pass_itself_off_as_the_target() -> None:
    net = SimulatedNetwork(seed=8)
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(3)
        ]
        net.block(a.public_key, c.public_key)
        await link(a, b)
        await link(c, b)
        impostor = ImpostorRelay(b.identity)
        b._relay = impostor  # type: ignore[assignment]
        with pytest.raises(ConnectError) as info:
            await a.call(c.public_key, relay_address((b.public_key,), c.public_key))
        mismatch = info.value.__cause__
        assert isinstance(mismatch, IdentityMismatchError)
        assert mismatch.actual == b.public_key
        assert impostor.attempts == 1
        assert c.public_key not in a.peers


async def test_a_direct_link_replaces_a_relayed_one() -> None:
    net = SimulatedNetwork(seed=9)
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(3)
        ]
        net.block(a.public_key, c.public_key)
        c.handle("echo", echo)
        await link(a, b)
        await link(c, b)
        relayed = await a.call(c.public_key, relay_address((b.public_key,), c.public_key))
        stream = await a.open_stream(c.public_key, "echo")
        await stream.send(b"x")
        assert await stream.receive() == b"x"
        net.unblock(a.public_key, c.public_key)
        a_events = a.events()
        direct = await a.call(c.public_key, f"mem://{c.public_key}")  # upgrades
        assert direct is relayed  # the same Peer carries on over the better link
        assert direct.remote_address == f"mem://{c.public_key}"
        with anyio.fail_after(WAIT), pytest.raises((anyio.BrokenResourceError, StreamResetError)):
            await stream.receive()  # streams of the replaced link end
        with anyio.fail_after(WAIT):
            while c.peers[a.public_key].remote_address != f"mem://{a.public_key}":
                await anyio.wait_all_tasks_blocked()
            while b.statistics().relay.circuits:
                await anyio.wait_all_tasks_blocked()
        assert a.statistics().duplicate_links == 1
        assert await a.call(c.public_key) is direct  # and calls keep it
        # a relayed call no longer replaces it: the direct link is kept
        kept = await a.call(c.public_key, relay_address((b.public_key,), c.public_key))
        assert kept.remote_address == f"mem://{c.public_key}"
        await next_event_none(a_events)


async def next_event_none(events: AsyncIterator[SwarmEvent]) -> None:
    """No link came or went so far (events are queued when they happen)."""
    with anyio.move_on_after(0.05):
        async for event in events:
            assert not isinstance(event, PeerConnected | PeerDisconnected), event


async def test_simultaneous_direct_and_relayed_calls_keep_the_direct_link() -> None:
    net = SimulatedNetwork(seed=10)
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(3)
        ]
        await link(a, b)
        await link(c, b)
        a_events, c_events = a.events(), c.events()
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.call, c.public_key, relay_address((b.public_key,), c.public_key))
                tg.start_soon(c.call, a.public_key, f"mem://{a.public_key}")
            while not (
                a.peers[c.public_key].remote_address == f"mem://{c.public_key}"
                and c.peers[a.public_key].remote_address == f"mem://{a.public_key}"
            ):
                await anyio.wait_all_tasks_blocked()
        assert (await next_event(a_events, PeerConnected)).public_key == c.public_key
        assert (await next_event(c_events, PeerConnected)).public_key == a.public_key
        await next_event_none(a_events)
        await next_event_none(c_events)


async def test_relayed_links_stay_out_of_the_latency_rows() -> None:
    net = SimulatedNetwork(seed=11)
    async with contextlib.AsyncExitStack() as stack:
        a, b, c, d = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=swarm_config())
            )
            for _ in range(4)
        ]
        net.block(a.public_key, c.public_key)
        await link(a, b)
        await link(c, b)
        peer = await a.call(c.public_key, relay_address((b.public_key,), c.public_key))
        await peer.ping()
        await link(a, d)  # a link change: a publishes its row again

        def row() -> dict[PublicKey, float]:
            assert a.directory is not None
            return a.directory.latency_rows().get(a.public_key, {})

        await wait_until(a, lambda: d.public_key in row())
        assert set(row()) == {b.public_key, d.public_key}
        assert c.public_key in a.peers


async def test_a_relayed_link_follows_its_route_when_the_relay_degrades() -> None:
    net = SimulatedNetwork(seed=31)
    config = SwarmConfig(
        auto_mesh=False,
        link_publish_delay=0.01,
        link_publish_interval=0.05,
        probe=ProbeConfig(min_interval=0.05, max_interval=0.2),
    )
    async with contextlib.AsyncExitStack() as stack:
        a, c, fast, slow = [
            await stack.enter_async_context(Swarm(transports=[net.transport()], config=config))
            for _ in range(4)
        ]
        c.handle("echo", echo)
        net.block(a.public_key, c.public_key)
        for relay, latency in ((fast, 0.005), (slow, 0.020)):
            for end in (a, c):
                net.set_latency(relay.public_key, end.public_key, latency)
                await relay.call(end.public_key)

        async def until(condition: Callable[[], bool]) -> None:
            await wait_for_directory(a, condition, timeout=20, recheck=0.2)

        def through(relay: Swarm) -> bool:
            peer = a.peers.get(c.public_key)
            return peer is not None and peer.remote_address == relay_address(
                [relay.public_key], c.public_key
            )

        await until(lambda: a.route(c.public_key).hops == (fast.public_key,))
        await a.call(c.public_key)
        assert through(fast)
        for end in (a, c):  # the fast relay degrades: 5 ms -> 60 ms per leg
            net.set_latency(fast.public_key, end.public_key, 0.060)
        await until(lambda: a.route(c.public_key).hops == (slow.public_key,))
        await until(lambda: through(slow))  # the circuit moved with the route
        stream = await a.open_stream(c.public_key, "echo")  # new streams use the new path
        await stream.send(b"ping")
        assert await stream.receive() == b"ping"


class StallingTransport(Transport):
    """Dials by key and never answers, like WebRTC waiting for ICE behind a symmetric NAT."""

    scheme = "stall"

    def __init__(self) -> None:
        self.dials = 0
        self.cancelled = 0

    async def serve(
        self,
        local_key: PublicKey,
        handler: Any,
        *,
        task_status: anyio.abc.TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started([])
        await anyio.sleep_forever()

    async def dial(self, remote_key: PublicKey, address: str | None = None) -> Link:
        self.dials += 1
        try:
            await anyio.sleep_forever()
        finally:
            self.cancelled += 1
        raise AssertionError("unreachable")

    def can_dial(self, address: str | None) -> bool:
        return address is None


async def test_a_stalled_direct_dial_does_not_keep_the_relays_from_being_tried() -> None:
    net = SimulatedNetwork(seed=32)
    stalling = StallingTransport()
    config = SwarmConfig(auto_mesh=False, dial_stagger=0.2)
    async with (
        Swarm(transports=[stalling, net.transport()], config=config) as a,
        Swarm(transports=[net.transport()], config=config) as b,
        Swarm(transports=[net.transport()], config=config) as c,
    ):
        net.block(a.public_key, c.public_key)
        await b.call(a.public_key)
        await b.call(c.public_key)
        # no route known yet: by key (one attempt stalls, one is blocked), then b relays
        with anyio.fail_after(5):
            peer = await a.call(c.public_key, timeout=30)
        assert peer.remote_address == relay_address([b.public_key], c.public_key)
        # the stalled attempt of the call was cancelled when the relay won (another one,
        # the background direct dial that follows a relayed call, may still be waiting)
        assert stalling.dials >= 1
        assert stalling.cancelled >= 1


async def test_a_lying_member_cannot_draw_routes_through_itself() -> None:
    net = SimulatedNetwork(seed=33)
    config = SwarmConfig(auto_mesh=False, link_publish_delay=0.01, link_publish_interval=0.05)
    # the liar's own row machinery stays quiet after its first row: its lie stands
    quiet = dataclasses.replace(config, link_publish_interval=60, probe=None)
    async with contextlib.AsyncExitStack() as stack:
        a, b, c, liar = [
            await stack.enter_async_context(
                Swarm(transports=[net.transport()], config=quiet if n == 3 else config)
            )
            for n in range(4)
        ]
        net.block(a.public_key, c.public_key)
        for end in (a, c):
            net.set_latency(b.public_key, end.public_key, 0.010)
            await b.call(end.public_key)
        net.set_latency(liar.public_key, a.public_key, 0.005)  # a round trip of 10 ms
        await liar.call(a.public_key)
        await wait_for_route(a, c.public_key, (b.public_key,))
        # the liar claims free links to a (real, but 10 ms) and to c (none at all): taken
        # at its word, a -> liar -> c would cost 0 against 40 ms through b
        assert liar.directory is not None
        liar.directory.publish_latency({a.public_key: 0.0, c.public_key: 0.0})
        directory = a.directory
        assert directory is not None
        await wait_until(
            a, lambda: directory.latency_rows().get(liar.public_key, {}).get(c.public_key) == 0.0
        )
        assert a.route(c.public_key).hops == (b.public_key,)  # never through the liar
        route_to_liar = a.route(liar.public_key)
        assert route_to_liar.latency is not None
        assert route_to_liar.latency >= 0.009  # the edge costs the larger of the two figures
