"""The seed's example, in Python: three nodes meet over WebRTC through one call each.

node1 and node2 connect; node3 calls node1 and, through the swarm's directory and
its in-swarm signals, gets connected to every node. Each peer event is printed with
the time since the start, and then the time node3 took to be linked with everybody.
An embedded signaling server carries the first offers; it could stop right after.

Run: ``python examples/seed.py``
"""

from __future__ import annotations

import time

import anyio

from crdtswarm import Swarm
from crdtswarm.signaling import SignalingServer
from crdtswarm.transport.webrtc import WebRTCTransport


async def show_events(name: str, node: Swarm, start: float) -> None:
    """Print every event of ``node`` with the seconds since ``start``."""
    async for event in node.events():
        print(
            f"{time.perf_counter() - start:7.3f} s  {name}: {type(event).__name__} "
            f"{event.public_key.short}"
        )


async def main() -> None:
    """Start a signaling server and three nodes; node3 calls node1 only."""
    async with SignalingServer(host="127.0.0.1", port=0) as server:
        signaling = [server.url]
        async with (
            Swarm(transports=[WebRTCTransport()], signaling=signaling) as node1,
            Swarm(transports=[WebRTCTransport()], signaling=signaling) as node2,
            Swarm(transports=[WebRTCTransport()], signaling=signaling) as node3,
            anyio.create_task_group() as tg,
        ):
            names = {
                node1.public_key: "node1",
                node2.public_key: "node2",
                node3.public_key: "node3",
            }
            start = time.perf_counter()
            for name, node in (("node1", node1), ("node2", node2), ("node3", node3)):
                tg.start_soon(show_events, name, node, start)
            await node2.call(node1.public_key)
            joined = time.perf_counter()
            everybody = {node1.public_key, node2.public_key}
            events = node3.events()  # subscribe before calling: no event is missed
            with anyio.fail_after(30):
                await node3.call(node1.public_key)  # one call...
                while not everybody <= set(node3.peers):  # ...and node3 meets node2 too
                    await anext(events)
            took = time.perf_counter() - joined
            for key, peer in sorted(node3.peers.items()):
                print(f"node3 <-> {names[key]}: {peer.remote_address}")
            print(f"node3 linked with every node in {took * 1000:.0f} ms")
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
