"""Joining the whole swarm by calling any one member (directory + mesh)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack

import anyio
import pycrdt

from crdtswarm import Identity, MemberJoined, Swarm, SwarmConfig
from crdtswarm.mesh import MeshConfig
from crdtswarm.testing import SimulatedNetwork
from crdtswarm.transport.tcp import TcpTransport

WAIT = 20.0


async def settle(
    nodes: list[Swarm], condition: Callable[[], bool], docs: Sequence[pycrdt.Doc] = ()
) -> None:
    """Wait until ``condition()`` holds, re-checking after every event of any node
    (links, members) and every change of ``docs``."""
    send, receive = anyio.create_memory_object_stream[object](1000)

    def changed(event: object) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            send.send_nowait(event)

    subscriptions = [(doc, doc.observe(changed)) for doc in docs]

    async def forward(node: Swarm) -> None:
        events = node.events()
        try:
            async for event in events:
                await send.send(event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    try:
        with send, receive, anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for node in nodes:
                    tg.start_soon(forward, node)
                while not condition():
                    await receive.receive()
                tg.cancel_scope.cancel()
    finally:
        for doc, subscription in subscriptions:
            doc.unobserve(subscription)


def identities(n: int) -> list[Identity]:
    return [Identity(bytes([i + 10]) * 32) for i in range(n)]


async def test_a_newcomer_links_to_everybody_through_one_member() -> None:
    net = SimulatedNetwork(seed=11)
    config = SwarmConfig(mesh=MeshConfig(tick_interval=0.1))
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(Swarm(ident, [net.transport()], config=config))
            for ident in identities(5)
        ]
        first, *others = nodes
        for node in others[:-1]:
            await node.call(first.public_key)
        newcomer = others[-1]
        events = newcomer.events()
        await newcomer.call(others[-2].public_key)  # any one member will do
        everyone = {n.public_key for n in nodes}
        await settle(nodes, lambda: all(set(n.peers) == everyone - {n.public_key} for n in nodes))
        await settle(nodes, lambda: all(n.members == everyone for n in nodes))
        joined = set()
        with anyio.fail_after(WAIT):
            async for event in events:
                if isinstance(event, MemberJoined):
                    joined.add(event.public_key)
                if joined == everyone - {newcomer.public_key}:
                    break


async def test_a_partial_mesh_stays_connected_and_bounded() -> None:
    net = SimulatedNetwork(seed=12)
    config = SwarmConfig(mesh=MeshConfig(max_peers=3, tick_interval=0.1, min_link_age=0.3))
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(Swarm(ident, [net.transport()], config=config))
            for ident in identities(10)
        ]
        for node in nodes[1:]:
            await node.call(nodes[0].public_key)
        everyone = {n.public_key for n in nodes}
        await settle(nodes, lambda: all(n.members == everyone for n in nodes))
        # every node keeps max_peers links; the bootstrap node everyone called sheds
        # its surplus down to max_peers + max_peers // 2
        await settle(nodes, lambda: all(3 <= len(n.peers) <= 4 for n in nodes))
        # a doc edit made anywhere reaches everyone across the partial mesh
        nodes[-1].doc("notes").get("m", type=pycrdt.Map)["x"] = 1.0
        await settle(
            nodes,
            lambda: all(
                n.doc("notes").get("m", type=pycrdt.Map).to_py() == {"x": 1.0} for n in nodes
            ),
            [n.doc("notes") for n in nodes],
        )


async def test_join_over_tcp_uses_directory_addresses() -> None:
    config = SwarmConfig(mesh=MeshConfig(tick_interval=0.1))
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(Swarm(ident, [TcpTransport()], config=config))
            for ident in identities(3)
        ]
        a, b, c = nodes
        await b.call(a.public_key, a.addresses[0])
        await c.call(a.public_key, a.addresses[0])  # c learns b's address from the directory
        await settle(nodes, lambda: b.public_key in c.peers and c.public_key in b.peers)
        assert c.directory is not None
        assert c.directory.members[b.public_key].addresses == tuple(b.addresses)
