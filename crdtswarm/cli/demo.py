"""The ``crdtswarm`` command line.

``crdtswarm demo`` runs a short smoke run: two nodes on loopback TCP link, prove
their identities, ping, and move data over an encrypted substream, printing what
happens. ``crdtswarm key generate PATH`` / ``crdtswarm key show PATH`` manage
identity files.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import anyio
import click

from crdtswarm.swarm import PeerConnected, Swarm
from crdtswarm.transport.tcp import TcpTransport

if TYPE_CHECKING:
    from crdtswarm.identity import PublicKey
    from crdtswarm.mux import MuxStream

__all__ = ["register"]


def _say(message: str) -> None:
    print(message, flush=True)


async def _demo(size: int) -> int:
    payload = bytes(i % 251 for i in range(size))
    digest = hashlib.blake2b(payload).hexdigest()[:16]

    async def echo_sum(stream: MuxStream, remote: PublicKey) -> None:
        hasher = hashlib.blake2b()
        received = 0
        while True:
            try:
                chunk = await stream.receive()
            except anyio.EndOfStream:
                break
            hasher.update(chunk)
            received += len(chunk)
        await stream.send(f"{received} {hasher.hexdigest()[:16]}".encode())

    async with (
        Swarm(transports=[TcpTransport("127.0.0.1", 0)]) as node1,
        Swarm(transports=[TcpTransport("127.0.0.1", 0)]) as node2,
    ):
        _say(f"node1 {node1.public_key.short}… listening at {', '.join(node1.addresses)}")
        _say(f"node2 {node2.public_key.short}… listening at {', '.join(node2.addresses)}")
        node1.handle("checksum", echo_sum)
        events = node1.events()
        start = time.perf_counter()
        peer = await node2.call(node1.public_key, node1.addresses[0], timeout=10)
        linked = time.perf_counter() - start
        event = await anext(events)
        assert isinstance(event, PeerConnected)
        _say(
            f"node2 called node1: Noise XX handshake done, identity verified "
            f"({linked * 1000:.1f} ms); node1 saw {type(event).__name__} "
            f"{event.public_key.short}…"
        )
        rtts = [await peer.ping() for _ in range(5)]
        smoothed = peer.rtt if peer.rtt is not None else min(rtts)
        _say(f"ping node2 -> node1: {min(rtts) * 1000:.2f} ms (smoothed {smoothed * 1000:.2f} ms)")
        stream = await node2.open_stream(node1.public_key, "checksum")
        start = time.perf_counter()
        for offset in range(0, len(payload), 65536):
            await stream.send(payload[offset : offset + 65536])
        await stream.send_eof()
        answer = (await stream.receive()).decode()
        elapsed = time.perf_counter() - start
        await stream.aclose()
        received, their_digest = answer.split()
        ok = int(received) == size and their_digest == digest
        _say(
            f"sent {size / 1e6:.1f} MB on an encrypted substream in {elapsed * 1000:.0f} ms "
            f"({size / elapsed / 1e6:.0f} MB/s); node1 received {int(received) / 1e6:.1f} MB, "
            f"checksum {'matches' if ok else 'DIFFERS'}"
        )
        stats = peer.statistics()
        _say(f"link: {stats.transport} {stats.remote_address}, {stats.bytes_sent} bytes sent")
    _say("both nodes shut down cleanly" if ok else "FAILED: data did not arrive intact")
    return 0 if ok else 1


@click.command("demo")
@click.option(
    "--bytes", "size", type=int, default=16 * 1024 * 1024, show_default=True, help="Bytes to send."
)
def demo(size: int) -> int:
    """Two nodes on loopback TCP: link, ping, and move data over an encrypted substream."""
    return anyio.run(_demo, size)


def register(group: click.Group) -> None:
    """Add ``demo`` to the command group."""
    group.add_command(demo)
