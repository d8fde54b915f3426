from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from crdtswarm import (
    ConnectError,
    ErrorCode,
    HandshakeError,
    Identity,
    IdentityMismatchError,
    PeerConnected,
    PeerDisconnected,
    PublicKey,
    RpcError,
    RpcTimeoutError,
    Stream,
    StreamResetError,
    Swarm,
    SwarmConfig,
    SwarmEvent,
)
from crdtswarm.testing import SimulatedNetwork, wait_for_directory
from crdtswarm.transport.abc import Link, Transport
from crdtswarm.transport.tcp import TcpTransport

WAIT = 10.0


async def next_event(events: AsyncIterator[SwarmEvent], kind: type) -> SwarmEvent:
    with anyio.fail_after(WAIT):
        async for event in events:
            if isinstance(event, kind):
                return event
    raise AssertionError("event stream ended")


async def echo(stream: Stream, remote: PublicKey) -> None:
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            return
        await stream.send(data)


async def test_call_by_key_on_the_simulated_network(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=1)
    async with (
        Swarm(alice, [net.transport()]) as a,
        Swarm(bob, [net.transport()]) as b,
    ):
        a_events, b_events = a.events(), b.events()
        peer = await a.call(bob.public_key)
        assert peer.public_key == bob.public_key
        assert (await next_event(a_events, PeerConnected)).public_key == bob.public_key
        assert (await next_event(b_events, PeerConnected)).public_key == alice.public_key
        assert set(a.peers) == {bob.public_key}
        assert set(b.peers) == {alice.public_key}
        assert await a.call(str(bob.public_key)) is peer  # already linked: same Peer


async def test_ping_feeds_smoothed_rtt(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=1)
    async with Swarm(alice, [net.transport()]) as a, Swarm(bob, [net.transport()]):
        net.set_latency(alice.public_key, bob.public_key, 0.010)
        peer = await a.call(bob.public_key)
        assert peer.rtt is None
        samples = [await peer.ping() for _ in range(3)]
        assert all(s >= 0.020 for s in samples)  # two one-way trips of 10 ms
        assert peer.rtt is not None
        assert min(samples) <= peer.rtt <= max(samples)


async def test_streams_echo_and_unknown_protocol(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=2)
    async with Swarm(alice, [net.transport()]) as a, Swarm(bob, [net.transport()]) as b:
        b.handle("echo", echo)
        stream = await a.open_stream(bob.public_key, "echo")
        await stream.send(b"hi")
        assert await stream.receive() == b"hi"
        await stream.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        await stream.aclose()

        nobody = await a.open_stream(bob.public_key, "nobody-serves-this")
        with pytest.raises(StreamResetError) as info:
            await nobody.receive()
        assert info.value.code == ErrorCode.UNKNOWN_PROTOCOL
        assert "nobody-serves-this" in info.value.message


async def test_a_slow_reader_does_not_stall_other_streams(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=3)
    stalled = anyio.Event()

    async def never_reads(stream: Stream, remote: PublicKey) -> None:
        await stalled.wait()

    async with Swarm(alice, [net.transport()]) as a, Swarm(bob, [net.transport()]) as b:
        b.handle("echo", echo)
        b.handle("stuck", never_reads)
        stuck = await a.open_stream(bob.public_key, "stuck")
        window = a.config.stream_window_size
        with anyio.move_on_after(0.5) as scope:
            for _ in range(4 * window // 65536):
                await stuck.send(bytes(65536))
        assert scope.cancelled_caught, "the sender should block once the window is used"
        stream = await a.open_stream(bob.public_key, "echo")
        with anyio.fail_after(WAIT):
            await stream.send(b"still flowing")
            assert await stream.receive() == b"still flowing"
        stalled.set()


async def test_rpc_answers_errors_and_timeouts(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=4)
    cancelled = anyio.Event()

    async def upper(payload: bytes, remote: PublicKey) -> bytes:
        assert remote == alice.public_key
        return payload.upper()

    async def fail(payload: bytes, remote: PublicKey) -> bytes:
        raise RpcError(ErrorCode.APPLICATION_ERROR, "no can do")

    async def hang(payload: bytes, remote: PublicKey) -> bytes:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return b""  # pragma: no cover

    async with Swarm(alice, [net.transport()]) as a, Swarm(bob, [net.transport()]) as b:
        b.handle_rpc("upper", upper)
        b.handle_rpc("fail", fail)
        b.handle_rpc("hang", hang)
        peer = await a.call(bob.public_key)
        assert await peer.rpc("upper", b"abc") == b"ABC"
        with pytest.raises(RpcError) as info:
            await peer.rpc("fail")
        assert info.value.code == ErrorCode.APPLICATION_ERROR
        assert info.value.message == "no can do"
        with pytest.raises(RpcError) as info:
            await peer.rpc("missing")
        assert info.value.code == ErrorCode.UNKNOWN_METHOD
        with pytest.raises(RpcTimeoutError):
            await peer.rpc("hang", timeout=0.2)
        with anyio.fail_after(WAIT):
            await cancelled.wait()  # the callee was told to give up
        results = []

        async def one(i: int) -> None:
            results.append(await peer.rpc("upper", f"x{i}".encode()))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert sorted(results) == sorted(f"X{i}".encode() for i in range(50))


async def test_tcp_call_with_address(alice: Identity, bob: Identity) -> None:
    async with (
        Swarm(alice, [TcpTransport("127.0.0.1", 0)]) as a,
        Swarm(bob, [TcpTransport("127.0.0.1", 0)]) as b,
    ):
        assert len(b.addresses) == 1
        assert b.addresses[0].startswith("tcp://127.0.0.1:")
        b.handle("echo", echo)
        peer = await a.call(bob.public_key, b.addresses[0])
        assert peer.remote_address is not None
        stream = await peer.open_stream("echo")
        payload = os.urandom(1_000_000)
        async with anyio.create_task_group() as tg:

            async def send() -> None:
                for i in range(0, len(payload), 50_000):
                    await stream.send(payload[i : i + 50_000])
                await stream.send_eof()

            tg.start_soon(send)
            received = bytearray()
            with anyio.fail_after(WAIT):
                while len(received) < len(payload):
                    received += await stream.receive()
        assert bytes(received) == payload


async def test_wrong_identity_at_address_is_refused(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    async with (
        Swarm(alice, [TcpTransport()]) as a,
        Swarm(bob, [TcpTransport()]) as b,
    ):
        with pytest.raises(ConnectError) as info:
            await a.call(carol.public_key, b.addresses[0], timeout=WAIT)
        assert isinstance(info.value.__cause__, IdentityMismatchError)
        assert a.peers == {}


async def test_unknown_key_fails_fast_and_timeout_is_honoured(
    alice: Identity, bob: Identity
) -> None:
    net = SimulatedNetwork(seed=5)
    async with Swarm(alice, [net.transport()]) as a:
        with anyio.fail_after(WAIT), pytest.raises((ConnectError, TimeoutError)):
            await a.call(bob.public_key, timeout=1.0)
    async with Swarm(alice, [TcpTransport()]) as a:
        with pytest.raises(ConnectError, match="no address"):
            await a.call(bob.public_key)
        # a listener that never answers the handshake: the timeout must hold
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            start = anyio.current_time()
            with pytest.raises((TimeoutError, ConnectError)):
                await a.call(bob.public_key, f"tcp://127.0.0.1:{port}", timeout=0.5)
            assert anyio.current_time() - start < 5


async def test_private_swarm_keys(alice: Identity, bob: Identity, carol: Identity) -> None:
    net = SimulatedNetwork(seed=6)
    key = bytes(range(32))
    async with (
        Swarm(alice, [net.transport()], swarm_key=key) as a,
        Swarm(bob, [net.transport()], swarm_key=key) as b,
        Swarm(carol, [net.transport()]) as c,
    ):
        await a.call(bob.public_key)
        for caller, callee in [(c, a), (a, c)]:
            with pytest.raises(ConnectError) as info:
                await caller.call(callee.public_key, timeout=WAIT)
            assert isinstance(info.value.__cause__, HandshakeError)
        assert set(a.peers) == {bob.public_key}
        assert c.peers == {}
        assert set(b.peers) == {alice.public_key}
        # the callee side of each failed handshake ends too (it gets the abort)
        with anyio.fail_after(WAIT):
            while a.statistics().pending_handshakes or c.statistics().pending_handshakes:
                await anyio.wait_all_tasks_blocked()
        assert c.statistics().dials_failed == 1
        assert a.statistics().links_refused == 1
        assert c.statistics().links_refused == 1
    with pytest.raises(ValueError, match="32 bytes"):
        Swarm(alice, [net.transport()], swarm_key=b"short")


async def test_simultaneous_calls_end_with_one_link(alice: Identity, bob: Identity) -> None:
    smaller = min(alice.public_key, bob.public_key)
    for seed in range(5):
        net = SimulatedNetwork(seed=seed)
        async with Swarm(alice, [net.transport()]) as a, Swarm(bob, [net.transport()]) as b:
            a_events, b_events = a.events(), b.events()
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.call, bob.public_key)
                tg.start_soon(b.call, alice.public_key)
            # both sides settle on the link that the smaller key dialled
            with anyio.fail_after(WAIT):
                while True:
                    pa, pb = a.peers.get(bob.public_key), b.peers.get(alice.public_key)
                    if pa and pb:
                        sa, sb = pa.statistics(), pb.statistics()
                        if sa.is_initiator == (alice.public_key == smaller) and (
                            sb.is_initiator == (bob.public_key == smaller)
                        ):
                            break
                    await anyio.wait_all_tasks_blocked()
            assert await a.peers[bob.public_key].ping() > 0
            assert await b.peers[alice.public_key].ping() > 0
            duplicates = a.statistics().duplicate_links + b.statistics().duplicate_links
            assert duplicates >= 1  # both calls produced a link; one of them was closed
        # one PeerConnected each; the only PeerDisconnected comes from the shutdown
        for events in (a_events, b_events):
            seen = [type(e) async for e in events]
            links = [kind for kind in seen if kind in (PeerConnected, PeerDisconnected)]
            assert links == [PeerConnected, PeerDisconnected], seen


async def test_block_produces_peer_disconnected(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=7)
    async with Swarm(alice, [net.transport()]) as a, Swarm(bob, [net.transport()]) as b:
        events = a.events()
        await a.call(bob.public_key)
        await next_event(events, PeerConnected)
        net.block(alice.public_key, bob.public_key)
        gone = await next_event(events, PeerDisconnected)
        assert gone.public_key == bob.public_key
        assert a.peers == {}
        with anyio.fail_after(WAIT):
            while b.peers:
                await anyio.wait_all_tasks_blocked()
        net.unblock(alice.public_key, bob.public_key)
        await a.call(bob.public_key)
        assert (await next_event(events, PeerConnected)).public_key == bob.public_key


async def test_shutdown_leaves_no_task_or_socket(alice: Identity, bob: Identity) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    tasks_before = len(asyncio.all_tasks())
    fds_before = fds()
    async with Swarm(alice, [TcpTransport()]) as a, Swarm(bob, [TcpTransport()]) as b:
        b.handle("echo", echo)
        peer = await a.call(bob.public_key, b.addresses[0])
        await peer.ping()
        stream = await peer.open_stream("echo")
        await stream.send(b"x")
        assert await stream.receive() == b"x"
    await anyio.wait_all_tasks_blocked()
    assert len(asyncio.all_tasks()) == tasks_before
    assert fds() == fds_before


async def test_node_survives_random_bytes_and_idle_sockets(alice: Identity, bob: Identity) -> None:
    config = SwarmConfig(handshake_timeout=0.5, max_pending_handshakes=4)
    rng = random.Random(1)
    async with (
        Swarm(alice, [TcpTransport()], config=config) as a,
        Swarm(bob, [TcpTransport()]) as b,
    ):
        host, port = a.addresses[0].removeprefix("tcp://").rsplit(":", 1)
        idle = [await anyio.connect_tcp(host, int(port)) for _ in range(8)]  # never speak
        for _ in range(20):
            sock = await anyio.connect_tcp(host, int(port))
            try:
                await sock.send(rng.randbytes(rng.randrange(1, 5000)))
                with anyio.move_on_after(2):
                    while await sock.receive():
                        pass
            except (anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                pass
            finally:
                await sock.aclose()
        # idle sockets are dropped once the handshake timeout expires
        for sock in idle:
            with anyio.fail_after(WAIT):
                try:
                    while await sock.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
            await sock.aclose()
        peer = await b.call(alice.public_key, a.addresses[0])
        assert await peer.ping() > 0
        stats = a.statistics()
        assert stats.links_refused >= 20  # every garbage and idle socket was dropped
        assert stats.links_accepted == 1
        assert stats.pending_handshakes == 0


class FreezableLink(Link):
    """A link that can go silent: sends vanish and nothing more arrives (a dead network)."""

    def __init__(self, inner: Link, frozen: anyio.Event) -> None:
        self._inner = inner
        self._frozen = frozen

    @property
    def max_message_size(self) -> int:
        return self._inner.max_message_size

    async def send(self, item: bytes) -> None:
        if not self._frozen.is_set():
            await self._inner.send(item)
        else:
            await anyio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        if self._frozen.is_set():
            await anyio.sleep_forever()
        async with anyio.create_task_group() as tg:
            result: list[bytes] = []

            async def get() -> None:
                result.append(await self._inner.receive())
                tg.cancel_scope.cancel()

            async def freeze() -> None:
                await self._frozen.wait()
                await anyio.sleep_forever()

            tg.start_soon(get)
            tg.start_soon(freeze)
        return result[0]

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


class FreezableTransport(Transport):
    scheme = "mem"

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.frozen = anyio.Event()

    async def serve(self, local_key, handler, *, task_status=anyio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
        async def wrapped(link: Link) -> None:
            await handler(FreezableLink(link, self.frozen))

        await self._inner.serve(local_key, wrapped, task_status=task_status)

    async def dial(self, remote_key: PublicKey, address: str | None = None) -> Link:
        return FreezableLink(await self._inner.dial(remote_key, address), self.frozen)

    def can_dial(self, address: str | None) -> bool:
        return self._inner.can_dial(address)


async def test_keepalive_detects_a_dead_peer(alice: Identity, bob: Identity) -> None:
    net = SimulatedNetwork(seed=8)
    transport = FreezableTransport(net.transport())
    config = SwarmConfig(keepalive_interval=0.1, peer_timeout=0.6)
    async with (
        Swarm(alice, [transport], config=config) as a,
        Swarm(bob, [net.transport()], config=config) as b,
    ):
        a_events, b_events = a.events(), b.events()
        await b.call(alice.public_key)
        await next_event(b_events, PeerConnected)
        start = anyio.current_time()
        transport.frozen.set()  # alice's network goes silent, no error anywhere
        gone = await next_event(b_events, PeerDisconnected)
        elapsed = anyio.current_time() - start
        assert gone.public_key == alice.public_key
        assert "keepalive" in gone.reason
        # the clock runs from the last frame received, at most one keepalive interval ago
        assert 0.6 - 0.1 - 0.05 <= elapsed < 5
        assert (await next_event(a_events, PeerDisconnected)).public_key == bob.public_key


async def test_route_follows_the_latency_rows() -> None:

    net = SimulatedNetwork(seed=21)
    config = SwarmConfig(auto_mesh=False, link_publish_delay=0.01, link_publish_interval=0.01)
    async with (
        Swarm(transports=[net.transport()], config=config) as a,
        Swarm(transports=[net.transport()], config=config) as b,
        Swarm(transports=[net.transport()], config=config) as c,
    ):
        assert a.route(c.public_key).latency is None  # nothing known yet
        net.set_latency(a.public_key, b.public_key, 0.010)
        net.set_latency(b.public_key, c.public_key, 0.010)
        await b.call(a.public_key)
        await b.call(c.public_key)
        await wait_for_directory(a, lambda: a.route(c.public_key).latency is not None, timeout=10)
        route = a.route(str(c.public_key))
        assert route.hops == (b.public_key,)
        assert 0.039 <= route.latency < 0.1  # two round trips of 20 ms
        assert a.route(b.public_key).hops == ()


async def test_links_are_probed_and_rows_follow_latency_changes() -> None:
    from crdtswarm.protocol.probe import ProbeConfig

    net = SimulatedNetwork(seed=22)
    config = SwarmConfig(
        auto_mesh=False,
        link_publish_delay=0.01,
        link_publish_interval=0.01,
        probe=ProbeConfig(min_interval=0.05, max_interval=0.2),
    )
    async with (
        Swarm(transports=[net.transport()], config=config) as a,
        Swarm(transports=[net.transport()], config=config) as b,
    ):
        net.set_latency(a.public_key, b.public_key, 0.005)
        await a.call(b.public_key)

        async def until(condition: Callable[[], bool]) -> None:
            await wait_for_directory(a, condition, timeout=20)

        def rtt() -> float | None:
            return a.route(b.public_key).latency

        await until(lambda: (rtt() or 1.0) < 0.03)
        net.set_latency(a.public_key, b.public_key, 0.050)  # the path gets slow
        await until(lambda: (rtt() or 0.0) > 0.06)  # probes saw it; rows followed
        probes = a.statistics().probes
        assert probes is not None
        assert probes.probes_answered >= 3
        assert probes.bytes_sent == probes.probes_sent * ProbeConfig().probe_size


async def test_the_latency_mesh_elects_the_relay_hub_and_routes_through_it() -> None:
    from crdtswarm.mesh import MeshConfig
    from crdtswarm.protocol.probe import ProbeConfig

    net = SimulatedNetwork(seed=23)
    config = SwarmConfig(
        link_publish_delay=0.01,
        link_publish_interval=0.05,
        probe=ProbeConfig(min_interval=0.05, max_interval=0.2),
        mesh=MeshConfig(
            max_peers=2, relay_hubs=1, election_interval=0.3, min_link_age=0.2, tick_interval=0.1
        ),
    )
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(Swarm(transports=[net.transport()], config=config))
            for _ in range(7)
        ]
        hub, others = nodes[0], nodes[1:]
        for a in nodes:  # the hub is 5 ms from everybody, every other pair is 100 ms apart
            for b in nodes:
                if a is not b:
                    net.set_latency(a.public_key, b.public_key, 0.005 if hub in (a, b) else 0.1)
        for node in others[:-1]:
            await node.call(hub.public_key)
        await others[-1].call(others[0].public_key)  # the last one does not know the hub

        def settled() -> bool:
            return all(
                n.relay_hubs == [hub.public_key] and (n is hub or hub.public_key in n.peers)
                for n in nodes
            )

        async def until(condition: Callable[[], bool], timeout: float) -> None:
            # recheck: elections run on their own timer
            await wait_for_directory(hub, condition, timeout=timeout, recheck=0.2)

        await until(settled, 30)
        assert len(hub.peers) == len(others)  # a hub is never shed for being over the limit
        # two nodes that share no link route through the hub
        a, b = next(
            (a, b) for a in others for b in others if a is not b and b.public_key not in a.peers
        )
        await until(lambda: a.route(b.public_key).hops == (hub.public_key,), 10)
        route = a.route(b.public_key)
        assert route.latency is not None
        assert route.latency < 0.2  # 10 ms nominal; any path avoiding the hub costs >= 0.2 s


async def test_a_relayed_link_is_upgraded_to_a_direct_one_when_the_direct_path_works() -> None:

    net = SimulatedNetwork(seed=24)
    config = SwarmConfig(auto_mesh=False, link_publish_delay=0.01, link_publish_interval=0.01)
    async with (
        Swarm(transports=[net.transport()], config=config) as a,
        Swarm(transports=[net.transport()], config=config) as b,
        Swarm(transports=[net.transport()], config=config) as c,
    ):
        await b.call(a.public_key)
        await b.call(c.public_key)
        await wait_for_directory(
            a, lambda: a.route(c.public_key).hops == (b.public_key,), timeout=10
        )
        events = a.events()
        peer = await a.call(c.public_key)  # the route goes through b: relayed first
        assert peer.remote_address.startswith("relay://")
        with anyio.fail_after(10):  # then the background direct dial replaces it
            while not (
                c.public_key in a.peers
                and not a.peers[c.public_key].remote_address.startswith("relay://")
            ):
                with anyio.move_on_after(0.1):  # a replaced link emits no event
                    await anext(events)
        stream = await a.open_stream(c.public_key, "missing")  # new streams go direct
        assert stream is not None


async def test_routes_drop_a_relay_as_soon_as_it_leaves_the_directory() -> None:

    net = SimulatedNetwork(seed=25)
    # rows are republished at most once a minute: only b's leaving can clear the route
    config = SwarmConfig(auto_mesh=False, link_publish_delay=0.01, link_publish_interval=60)
    async with (
        Swarm(transports=[net.transport()], config=config) as a,
        Swarm(transports=[net.transport()], config=config) as c,
    ):

        async def until(condition: Callable[[], bool]) -> None:
            await wait_for_directory(a, condition, timeout=10)

        async with Swarm(transports=[net.transport()], config=config) as b:
            await b.call(a.public_key)
            await b.call(c.public_key)
            await until(lambda: a.route(c.public_key).hops == (b.public_key,))
        await until(lambda: a.route(c.public_key).latency is None)


async def test_routing_config_bounds_the_relays_of_a_route() -> None:
    from crdtswarm.protocol.routing import RoutingConfig

    with pytest.raises(ValueError, match="max_relays"):
        SwarmConfig(routing=RoutingConfig(max_relays=3))
    net = SimulatedNetwork(seed=26)
    base = SwarmConfig(auto_mesh=False, link_publish_delay=0.01, link_publish_interval=0.01)
    one = SwarmConfig(
        auto_mesh=False,
        link_publish_delay=0.01,
        link_publish_interval=0.01,
        routing=RoutingConfig(max_relays=1),
    )
    async with (
        Swarm(transports=[net.transport()], config=base) as a,
        Swarm(transports=[net.transport()], config=one) as a1,
        Swarm(transports=[net.transport()], config=base) as b,
        Swarm(transports=[net.transport()], config=base) as c,
        Swarm(transports=[net.transport()], config=base) as d,
    ):
        await b.call(a.public_key)
        await b.call(a1.public_key)
        await b.call(c.public_key)
        await c.call(d.public_key)  # a, a1 -- b -- c -- d: d is two relays away
        await wait_for_directory(
            a,
            lambda: (
                a.route(d.public_key).hops == (b.public_key, c.public_key)
                and a1.route(c.public_key).hops == (b.public_key,)  # one relay is allowed
            ),
            recheck=0.2,  # a1 may see the rows a moment later than a
        )
        assert a1.route(d.public_key).latency is None  # two are not


async def test_wait_for_directory_times_out_when_the_condition_never_holds() -> None:
    net = SimulatedNetwork(seed=27)
    async with Swarm(transports=[net.transport()]) as node:
        with pytest.raises(TimeoutError):
            await wait_for_directory(node, lambda: False, timeout=0.2, recheck=0.05)
        await wait_for_directory(node, lambda: node.public_key in node.members)
