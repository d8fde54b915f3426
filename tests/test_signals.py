"""WebRTC signals through the swarm: peers, signaling servers and the directory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from crdtswarm import Identity, Swarm, SwarmConfig
from crdtswarm.errors import RpcError
from crdtswarm.protocol.signal import seal_signal
from crdtswarm.signaling import SignalingServer
from crdtswarm.signals import FORWARD_METHOD
from crdtswarm.testing import wait_for_directory
from crdtswarm.transport.tcp import TcpTransport
from crdtswarm.transport.webrtc import WebRTCTransport

WAIT = 20.0
MANUAL = SwarmConfig(auto_mesh=False)


def node(*, signaling: list[str] | None = None, config: SwarmConfig | None = None) -> Swarm:
    return Swarm(
        transports=[WebRTCTransport(), TcpTransport()],
        signaling=signaling or (),
        config=config or SwarmConfig(),
    )


async def linked(node: Swarm, *others: Swarm) -> None:
    """Wait until ``node`` has a direct link to each of ``others``."""
    keys = {other.public_key for other in others}
    events = node.events()
    with anyio.fail_after(WAIT):
        while not keys <= set(node.peers):
            await anext(events)


def over_webrtc(node: Swarm, other: Swarm) -> bool:
    address = node.peers[other.public_key].remote_address
    return address is not None and address.startswith("webrtc://")


@contextlib.asynccontextmanager
async def nodes(count: int, **kwargs: object) -> AsyncIterator[list[Swarm]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(node(**kwargs)) for _ in range(count)]  # type: ignore[arg-type]


async def test_a_newcomer_meshes_over_webrtc_after_the_servers_are_gone() -> None:
    async with contextlib.AsyncExitStack() as stack:
        async with contextlib.AsyncExitStack() as server_stack:
            server = await server_stack.enter_async_context(SignalingServer())
            a = await stack.enter_async_context(node(signaling=[server.url]))
            b = await stack.enter_async_context(node(signaling=[server.url]))
            await b.call(a.public_key)  # by key: the offer goes through the server
            assert over_webrtc(b, a)
        # the only server is down; c reaches a over TCP, its bootstrap endpoint
        c = await stack.enter_async_context(node())
        tcp = next(addr for addr in a.addresses if addr.startswith("tcp://"))
        await c.call(a.public_key, tcp)
        await linked(c, b)  # found in the directory, signalled through the swarm
        assert over_webrtc(c, b)
        signals = [n.statistics().signals for n in (a, b, c)]
        assert sum(s.forwarded for s in signals) + sum(s.via_directory for s in signals) >= 1


async def until(condition: Callable[[], bool], node: Swarm) -> None:
    """Wait until ``condition()`` holds, re-checked on every change of the directory."""
    await wait_for_directory(node, condition, timeout=WAIT)


async def test_signals_cross_the_directory_when_no_peer_can_forward() -> None:
    async with nodes(4, config=MANUAL) as (a, b, c, d):
        tcp = {n.public_key: next(x for x in n.addresses if x.startswith("tcp://")) for n in (a, b)}
        await b.call(a.public_key, tcp[a.public_key])
        await c.call(b.public_key, tcp[b.public_key])
        await d.call(a.public_key, tcp[a.public_key])
        # d and c share no peer: the offer and the answer go through the directory
        await until(lambda: c.public_key in d.members, d)
        await d.call(c.public_key, timeout=WAIT)
        assert over_webrtc(d, c)
        assert d.statistics().signals.via_directory >= 1
        assert c.statistics().signals.via_directory >= 1


async def test_forged_and_replayed_signals_are_dropped() -> None:
    async with nodes(2, config=MANUAL) as (a, b):
        tcp = next(x for x in a.addresses if x.startswith("tcp://"))
        peer = await b.call(a.public_key, tcp)
        mallory = Identity.generate()
        now = time.time()
        good = seal_signal(b.identity, a.public_key, b"{}", now=now)
        forged = bytearray(seal_signal(mallory, a.public_key, b"{}", now=now))
        forged[-1] ^= 1
        for sealed in (good, good, bytes(forged), b"\x00" * 300):
            await peer.rpc(FORWARD_METHOD, bytes(a.public_key) + sealed)
        stats = a.statistics().signals
        assert (stats.delivered, stats.rejected) == (1, 3)
        # a node only forwards to nodes linked to it
        with pytest.raises(RpcError, match="not linked"):
            await peer.rpc(FORWARD_METHOD, bytes(Identity.generate().public_key) + good)
