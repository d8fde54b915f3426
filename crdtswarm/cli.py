"""The ``crdtswarm`` command line.

``crdtswarm demo`` runs a short smoke run: two nodes on loopback TCP link, prove
their identities, ping, and move data over an encrypted substream, printing what
happens. ``crdtswarm key generate PATH`` / ``crdtswarm key show PATH`` manage
identity files.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from typing import TYPE_CHECKING

import anyio

from crdtswarm.errors import CrdtSwarmError
from crdtswarm.identity import Identity, PublicKey
from crdtswarm.swarm import PeerConnected, Swarm
from crdtswarm.transport.tcp import TcpTransport

if TYPE_CHECKING:
    from collections.abc import Sequence

    from crdtswarm.mux import MuxStream

__all__ = ["main"]


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


def _key(args: argparse.Namespace) -> int:
    if args.action == "generate":
        identity = Identity.generate()
        identity.save(args.path)
        _say(str(identity.public_key))
    else:
        _say(str(Identity.load(args.path).public_key))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="crdtswarm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="two nodes on loopback TCP exchanging data")
    demo.add_argument("--bytes", type=int, default=16 * 1024 * 1024, help="bytes to send")
    key = commands.add_parser("key", help="generate or show an identity file")
    key.add_argument("action", choices=["generate", "show"])
    key.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return anyio.run(_demo, args.bytes)
        return _key(args)
    except (CrdtSwarmError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"crdtswarm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
